"""The task registry: every task builds its objective and resolves its default head; unknown tasks fail clearly."""

import json
import subprocess
import sys

import pytest

from deltavision.errors import MethodOptionError
from deltavision.model.build import resolve_head
from deltavision.tasks.registry import TASKS, get_task
from deltavision.train.objectives import objective_for

# task -> (its objective's task name, the metric keys it plots, its default head)
EXPECTED = {
    "classification": ("classification", {"top1", "top5"}, None),
    "segmentation": ("segmentation", {"miou", "pixel_acc"}, "upernet"),
    "detection": ("detection", {"box_ap", "box_ap50", "box_ap75"}, "fasterrcnn"),
    "instance": ("instance", {"box_ap", "box_ap50", "box_ap75", "mask_ap", "mask_ap50", "mask_ap75"}, "maskrcnn"),
}
UNKNOWN = "unknown task 'panoptic'; choose one of classification, segmentation, detection, instance"


def test_the_table_covers_every_registered_task():
    assert TASKS == tuple(EXPECTED)


@pytest.mark.parametrize("name", TASKS)
def test_every_task_builds_its_objective_and_resolves_its_default_head(name):
    objective_name, plotted, head = EXPECTED[name]
    task = get_task(name)
    objective = objective_for(name, ["a", "b"])
    assert task.name == name and objective.task == objective_name
    assert set(objective.plotted) == plotted
    assert resolve_head(name, None) == head
    assert task.dense == (head is not None)


@pytest.mark.parametrize("ask", [get_task, lambda name: resolve_head(name, None), objective_for])
def test_an_unknown_task_is_a_method_option_error_naming_the_known_ones(ask):
    with pytest.raises(MethodOptionError) as raised:
        ask("panoptic")
    assert str(raised.value) == UNKNOWN


def test_the_registry_imports_no_torch():
    script = ("import json, sys, deltavision.tasks.registry; "
              "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision'))))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == []
