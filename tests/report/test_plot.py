"""`timl plot` on the metrics.jsonl of real tiny runs: the values each figure plots, the figures' pixel sizes, and
the errors."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_GPT2, read_metrics, write_learnable_shards
from timl.config import TrainingArguments
from timl.cli import main as timl_main
from timl.report.metrics import Accuracy
from timl.report.plot import PANEL_HEIGHT, WIDTH, build_figures, load_run, main, pyplot

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ["loss.png", "lr.png", "throughput.png", "grad_norm.png", "metrics.png"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """Two real runs that differ in learning rate, with an accuracy metric at train and eval."""
    from timl.config import ModelArguments
    from timl.train.pretrain import pretrain

    data = tmp_path_factory.mktemp("data")
    write_learnable_shards(data, 4096, "train")
    write_learnable_shards(data, 640, "validation", seed=1)
    output_dirs = []
    for name, learning_rate in (("lr_high", 3e-3), ("lr_low", 1e-3)):
        args = TrainingArguments(
            output_dir=str(data / name), train_file_pattern=str(data / "train_*.bin"),
            eval_file_pattern=str(data / "validation_*.bin"), block_size=16, train_batch_size=8,
            per_device_train_batch_size=8, per_device_eval_batch_size=8, learning_rate=learning_rate,
            warmup_steps=2, max_train_steps=12, log_every_steps=2, eval_every_steps=6, save_every_steps=0,
            report_to="none", optim="adamw_torch")
        pretrain(ModelArguments(config_overrides=TINY_GPT2), args, train_metrics=[Accuracy()],
                 eval_metrics=[Accuracy()])
        output_dirs.append(data / name)
    return output_dirs


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk, which always comes first."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR"
    return struct.unpack(">II", header[16:24])


def expected_size(panels: int, dpi: int) -> tuple[int, int]:
    return round(WIDTH * dpi), round(PANEL_HEIGHT * panels * dpi)


def plotted(figure) -> list[list[tuple[list[float], list[float]]]]:
    """Each panel's lines, as the (x, y) values that matplotlib holds."""
    return [[([float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()]) for line in axis.get_lines()]
            for axis in figure.axes]


def test_each_figure_plots_the_logged_values(runs):
    logged = read_metrics(runs[0])
    train = [line for line in logged if "train_loss" in line]
    evals = [line for line in logged if "eval_loss" in line and "train_loss" not in line]
    values = lambda lines, key: [float(line[key]) for line in lines]
    steps, tokens = values(train, "step"), values(train, "tokens")
    eval_tokens = [step * 8 * 16 for step in values(evals, "step")]  # step × train_batch_size × block_size
    assert len(train) == 6 and len(evals) == 3
    figures = build_figures([load_run(runs[0], "lr_high")], dpi=50, log_y=False)
    try:
        assert plotted(figures["loss.png"]) == [[(tokens, values(train, "train_loss")),
                                                 (eval_tokens, values(evals, "eval_loss"))]]
        assert [line.get_label() for line in figures["loss.png"].axes[0].get_lines()] == ["train", "eval"]
        assert plotted(figures["lr.png"]) == [[(steps, values(train, "lr"))]]
        assert plotted(figures["throughput.png"]) == [[(steps, values(train, "tokens_per_second"))]]
        assert plotted(figures["grad_norm.png"]) == [[(steps, values(train, "grad_norm"))]]
        assert plotted(figures["metrics.png"]) == [[(tokens, values(train, "train_accuracy")),
                                                    (eval_tokens, values(evals, "eval_accuracy"))]]
    finally:
        for figure in figures.values():
            pyplot().close(figure)


def test_one_run_gives_every_figure_at_figsize_times_dpi(runs, capsys):
    assert main([str(runs[0]), "--dpi", "50"]) == 0
    plots = runs[0] / "plots"
    assert capsys.readouterr().out.split() == [str(plots / name) for name in FIGURES]
    for name in FIGURES:
        assert (plots / name).stat().st_size > 1000
    assert png_size(plots / "loss.png") == expected_size(1, 50)
    assert png_size(plots / "lr.png") == expected_size(1, 50)
    assert png_size(plots / "throughput.png") == expected_size(1, 50)  # no MFU on the CPU: one panel
    assert png_size(plots / "grad_norm.png") == expected_size(1, 50)
    assert png_size(plots / "metrics.png") == expected_size(1, 50)  # accuracy only


def test_two_runs_in_one_figure_through_the_cli_with_an_mfu_panel(runs, tmp_path):
    # A GPU run logs mfu and, with several optimizers, lr_<name>: add them to a copy of a real log.
    gpu_run = tmp_path / "gpu_run"
    gpu_run.mkdir()
    (gpu_run / "run_config.json").write_text((runs[0] / "run_config.json").read_text())
    lines = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        if "train_loss" in line:
            line.update(mfu=0.4, lr_adamw=line["lr"], lr_muon=10 * line["lr"])
    (gpu_run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    out = tmp_path / "comparison"
    assert timl_main(["plot", str(gpu_run), str(runs[1]), "--out", str(out), "--dpi", "40", "--log_y"]) == 0
    assert sorted(path.name for path in out.iterdir()) == sorted(FIGURES)
    assert png_size(out / "throughput.png") == expected_size(2, 40)  # tokens/s and MFU
    assert png_size(out / "loss.png") == expected_size(1, 40)


def test_python_dash_m_timl_plot_runs_in_a_fresh_process(runs, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "timl.report.plot", *map(str, runs), "--out", str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(tmp_path / name) for name in FIGURES]
    assert png_size(tmp_path / "loss.png") == expected_size(1, 100)  # the default dpi


def test_eval_points_are_placed_on_the_token_axis(runs):
    run = load_run(runs[0], "lr_high")
    assert [line["step"] for line in run.eval] == [0, 6, 12]
    assert [line["tokens"] for line in run.eval] == [0, 6 * 8 * 16, 12 * 8 * 16]  # train_batch_size × block_size


def test_eval_tokens_fall_back_to_the_train_lines_without_run_config(tmp_path):
    lines = [{"step": 0, "eval_loss": 4.0}, {"step": 2, "train_loss": 3.0, "tokens": 64}, {"step": 4, "eval_loss": 2.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert [line["tokens"] for line in load_run(tmp_path, "run").eval] == [0, 128]


def test_a_folder_without_metrics_is_a_clear_error(runs, tmp_path, capsys):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    assert main([str(runs[0]), str(empty)]) == 2
    captured = capsys.readouterr()
    assert f"{empty} has no metrics.jsonl" in captured.err
    assert captured.out == ""  # checked before any figure is drawn

    (empty / "metrics.jsonl").write_text('{"step": 1, "train_loss": 2.0}\nnot json\n')
    assert main([str(empty)]) == 2
    assert "metrics.jsonl, line 2: not JSON" in capsys.readouterr().err


def test_missing_matplotlib_says_how_to_install_it(runs, tmp_path):
    # A None entry in sys.modules makes `import matplotlib` raise ImportError, as if it were not installed.
    code = ("import sys; sys.modules['matplotlib'] = None; from timl.report.plot import main; "
            f"sys.exit(main([{str(runs[0])!r}, '--out', {str(tmp_path)!r}]))")
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert "timl plot needs matplotlib: pip install 'timl[plot]'" in result.stderr
    assert not list(tmp_path.iterdir())


def test_named_eval_sets_and_task_accuracies_are_drawn(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": 1, "train_loss": 4.0, "tokens": 64, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_second": 10.0},
             {"step": 1, "eval_val_loss": 3.9, "eval_code_loss": 4.2, "eval_facts_acc": 0.25,
              "eval_facts_acc_norm": 0.5},
             {"step": 2, "train_loss": 3.0, "tokens": 128, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_second": 10.0},
             {"step": 2, "eval_val_loss": 2.9, "eval_code_loss": 3.2, "eval_facts_acc": 0.5,
              "eval_facts_acc_norm": 0.75}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    figures = build_figures([load_run(run, "run")], dpi=50, log_y=False)
    try:
        assert [line.get_label() for line in figures["loss.png"].axes[0].get_lines()] == ["train", "eval code",
                                                                                           "eval val"]
        assert [axis.get_ylabel() for axis in figures["metrics.png"].axes] == ["facts_acc", "facts_acc_norm"]
        assert plotted(figures["metrics.png"])[0] == [([64.0, 128.0], [0.25, 0.5])]
    finally:
        for figure in figures.values():
            pyplot().close(figure)
