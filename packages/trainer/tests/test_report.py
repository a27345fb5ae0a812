"""Rank 0's account of a run: step lines with an ETA (plain when the log is not a terminal), a progress bar
on a terminal, checkpoint lines once each save is complete, grouped TensorBoard tags."""

import io

from trainer.config import check_run, load_run_config
from trainer.train.metrics import GROUPS, Metrics
from trainer.train.report import Checkpoints, ProgressBar, layout_modes


class Terminal(io.StringIO):
    def isatty(self):
        return True


def record(step):
    return {
        "step": step, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1234.0, "mfu": 0.1,
        "memory_mb": 10.0, "memory_reserved_mb": 12.0, "skipped": False, "step_time_s": 0.1,
        "data_time_s": 0.01, "tokens": 64 * step, "loss_scale": 65536.0,
    }  # fmt: skip


def test_plain_lines_when_the_log_is_not_a_terminal(tmp_path):
    out = io.StringIO()
    metrics = Metrics(active=True, metrics_file=str(tmp_path / "m.jsonl"), tensorboard=None, stream=out)
    metrics.start(10, 4)
    metrics.step(record(5), 10)
    metrics.close()
    line = out.getvalue()
    assert line.startswith("step      5/10  loss 2.5000") and " eta " in line and "\x1b[" not in line
    assert (tmp_path / "m.jsonl").read_text().count("\n") == 1


def test_a_progress_bar_with_eta_loss_and_tokens_per_second_on_a_terminal():
    out = Terminal()
    bar = ProgressBar(out, total=10, start=0)
    bar.update(4, record(4))
    bar.print("a line above the bar")
    bar.close()
    text = out.getvalue()
    assert "4/10" in text and "eta" in text and "loss 2.5000" in text and "1,234 tokens/s" in text
    assert "a line above the bar" in text


def test_inactive_ranks_say_nothing():
    out = io.StringIO()
    metrics = Metrics(active=False, metrics_file=None, tensorboard=None, stream=out)
    metrics.start(3, 0)
    metrics.banner(["model: x"])
    metrics.step(record(1), 3)
    metrics.checkpoints.saved(1, "ckpt/step_00000001")
    metrics.close()
    assert out.getvalue() == ""


class Handle:
    def __init__(self):
        self.finished = False

    def done(self):
        return self.finished


def test_a_background_save_is_reported_when_it_is_complete():
    said = []
    checkpoints = Checkpoints(said.append)
    checkpoints.saved(2, "ckpt/step_00000002")
    handle = Handle()
    checkpoints.saved(4, "ckpt/step_00000004", handle)
    checkpoints.poll()
    assert said == ["saved checkpoint step 2 to ckpt/step_00000002"]
    handle.finished = True
    checkpoints.poll()
    checkpoints.poll(finished=True)
    assert said[1:] == ["saved checkpoint step 4 to ckpt/step_00000004"]


def test_every_record_field_has_a_tensorboard_group():
    assert set(record(1)) - {"step"} <= set(GROUPS)
    assert {GROUPS["loss"], GROUPS["step_time_s"], GROUPS["memory_reserved_mb"], GROUPS["eval_loss"]} == {
        "train", "perf", "memory", "eval",
    }  # fmt: skip


def test_the_layout_line_says_how_the_plan_runs():
    def modes(world, parallel, train=None):
        return layout_modes(check_run(load_run_config(overrides={"parallel": parallel, "train": train or {}}), world))

    assert modes(2, {}) == ["DDP"]
    hsdp = modes(8, {"cp": 2, "dp_shard": 2}, {"zero": 3})
    assert hsdp == ["HSDP (ZeRO-3 over 4 ranks x 2 replicas)", "ring CP attention"]  # a shard group: 2 dp x 2 cp
    hierarchical = modes(8, {"cp": 4, "cp_a2a": 2, "pp": 2}, {"cp_attention": "hierarchical", "zero": 1})
    assert hierarchical[:2] == ["ZeRO-1", "hierarchical CP attention in all-to-all groups of 2"]
    uneven = modes(2, {"pp": 2, "pipeline_layout": [3, 1]}, {"global_batch": 8, "micro_batch": 2})
    assert uneven == ["DDP", "1f1b over 4 micro-batches, layers per stage [3, 1]"]
