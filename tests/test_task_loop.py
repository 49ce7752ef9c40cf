"""Pieces of the task loop: the alignment progress callback, and stage 1 leaving the model unpatched."""
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from slca_cli.learner import fit_task
from slca_cli.methods import get_method
from slca_cli.presets import RunConfig
from slca_cli.restore import build_model
from slca_cli.progress import alignment_progress
from slca_cli.backbones import get_backbone


class RedrawingBar:
    """Like tqdm: update() returns True on the calls that redraw."""

    def __init__(self):
        self.updates, self.postfix = 0, []

    def update(self, n):
        self.updates += n
        return True

    def set_postfix(self, **values):
        self.postfix.append(values["loss"])


def test_alignment_progress_shows_the_loss_of_every_epoch():
    bar, losses = RedrawingBar(), []
    on_epoch = alignment_progress(1, bar, losses)
    for epoch, loss in enumerate([5.568, 4.1, 3.25]):
        on_epoch(epoch, loss)
    assert bar.postfix == ["5.568", "4.100", "3.250"]
    assert losses == [5.568, 4.1, 3.25] and bar.updates == 3


def test_stage1_never_patches_the_model_and_prepares_each_task_afresh():
    cfg = RunConfig(dataset="synthetic", backbone="vit-tiny-test", method="sl", num_classes=4, task_sizes=(2, 2),
                    image_size=32, epochs=1)
    model = build_model(cfg, get_backbone(cfg.backbone), pretrained=False, seed=0)
    accelerator = Accelerator(cpu=True)
    method = get_method(cfg.method)
    for task in range(2):
        labels = torch.tensor([2 * task, 2 * task + 1] * 4)
        loader = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), labels), batch_size=4)
        model.add_head(2)
        head_before = model.task_heads[task].weight.detach().clone()
        fit_task(model, loader, accelerator, method.recipe(model, task, cfg), task=task, label_offset=2 * task,
                 show_progress=False)
        assert not {"forward", "_original_forward", "_is_accelerate_prepared"} & set(vars(model))
        assert not torch.equal(model.task_heads[task].weight, head_before)  # the task's own head trained
