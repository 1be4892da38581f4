"""`timl plot`: PNG figures of one or more runs, drawn from each output_dir's metrics.jsonl.

    timl plot runs/a                      # figures in runs/a/plots/
    timl plot runs/a runs/b --out cmp     # both runs in each figure, one line per run, labelled by folder name

Figures: loss.png (train and eval loss against tokens), lr.png (learning rates against step), throughput.png
(tokens/s, and MFU where logged, against step), grad_norm.png (gradient norm against step) and, when the run logged
train_* or eval_* metrics besides the loss, metrics.png (one panel per metric, against tokens).
matplotlib is an optional dependency: pip install 'timl[plot]'.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MISSING_MATPLOTLIB = "timl plot needs matplotlib: pip install 'timl[plot]'"
WIDTH = 8.0  # inches; every figure is this wide, and PANEL_HEIGHT tall per panel
PANEL_HEIGHT = 4.5
# Drawn in loss.png: metrics.png holds the other train_* and eval_* values.
NOT_METRICS = {"train_loss", "eval_loss"}


class PlotError(ValueError):
    """An output_dir that cannot be plotted, with a message naming it."""


class MissingMatplotlib(ImportError):
    """matplotlib, an optional dependency, is not installed."""


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend: files only, no display needed."""
    try:
        import matplotlib
    except ImportError:
        raise MissingMatplotlib(MISSING_MATPLOTLIB) from None
    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


@dataclass
class Run:
    """One output_dir's log: its train lines and eval lines, each with the tokens seen at its step."""

    name: str
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]

    def series(self, lines: list[dict[str, Any]], key: str, x: str = "step") -> tuple[list[float], list[float]]:
        """The (x, value) pairs of the lines that hold `key` (and `x`)."""
        points = [(line[x], line[key]) for line in lines if key in line and x in line and line[key] is not None]
        return [p[0] for p in points], [p[1] for p in points]


@dataclass
class Panel:
    """One panel of a figure: what its y axis shows, and against what (step or tokens)."""

    ylabel: str
    x: str
    log_y: bool = False
    y_format: Any = None  # a matplotlib tick formatter


def load_run(output_dir: Path, name: str) -> Run:
    path = output_dir / "metrics.jsonl"
    if not output_dir.is_dir():
        raise PlotError(f"{output_dir} is not a folder: give the output_dir of a timl run.")
    if not path.is_file():
        raise PlotError(f"{output_dir} has no metrics.jsonl: is it the output_dir of a timl run?")
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as error:
            raise PlotError(f"{path}, line {number}: not JSON ({error}).") from None
        if not isinstance(line, dict) or "step" not in line:
            raise PlotError(f"{path}, line {number}: a metrics line is a JSON object with a 'step'.")
        lines.append(line)
    if not lines:
        raise PlotError(f"{path} is empty: the run has logged nothing yet.")
    train = [line for line in lines if "train_loss" in line]
    # Eval lines: the losses of every eval set (eval_loss, eval_<name>_loss) and the tasks' accuracies.
    evals = [line for line in lines if "train_loss" not in line and any(key.startswith("eval_") for key in line)]
    tokens_per_step = read_tokens_per_step(output_dir, train)
    if tokens_per_step is not None:
        evals = [{"tokens": line["step"] * tokens_per_step, **line} for line in evals]
    return Run(name, train, evals)


def read_tokens_per_step(output_dir: Path, train: list[dict[str, Any]]) -> float | None:
    """Tokens per optimizer step, to place eval lines (which log no tokens) on the token axis: from the run's
    arguments in run_config.json, else from the train lines' tokens/step, else unknown."""
    try:
        args = json.loads((output_dir / "run_config.json").read_text())["args"]
        return args["train_batch_size"] * args["block_size"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for line in train:
        if line.get("tokens") and line["step"]:
            return line["tokens"] / line["step"]
    return None


def run_names(output_dirs: list[Path]) -> list[str]:
    """Folder names, or the paths as given where two folders share a name."""
    names = [path.resolve().name or str(path) for path in output_dirs]
    return [str(path) if names.count(name) > 1 else name for path, name in zip(output_dirs, names)]


def draw_figures(runs: list[Run], out: Path, dpi: int, log_y: bool) -> list[Path]:
    """Writes the figures of `build_figures` as PNGs in `out`; returns their paths."""
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, fig in build_figures(runs, dpi, log_y).items():
        fig.savefig(out / filename, dpi=dpi)
        plt.close(fig)
        written.append(out / filename)
    return written


def build_figures(runs: list[Run], dpi: int, log_y: bool) -> dict[str, Any]:
    """The matplotlib figures by file name (metrics.png only where metrics besides the loss were logged). The caller
    closes them."""
    plt = pyplot()
    from matplotlib.ticker import EngFormatter, LogFormatter, PercentFormatter

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {run.name: colors[index % len(colors)] for index, run in enumerate(runs)}
    title_suffix = runs[0].name if len(runs) == 1 else f"{len(runs)} runs"
    figures = {}

    def figure(filename: str, title: str, panels: list[Panel], lines: Any) -> None:
        """Draws one figure of stacked panels, calling `lines(axis, panel_index)` to draw each one's lines."""
        fig, axes = plt.subplots(len(panels), 1, figsize=(WIDTH, PANEL_HEIGHT * len(panels)), dpi=dpi,
                                 layout="constrained", squeeze=False)
        fig.suptitle(f"{title} ({title_suffix})")
        for index, (axis, panel) in enumerate(zip(axes[:, 0], panels)):
            lines(axis, index)
            axis.set_xlabel(panel.x)
            axis.set_ylabel(panel.ylabel)
            if panel.x == "tokens":
                axis.xaxis.set_major_formatter(EngFormatter())
            if panel.log_y:
                axis.set_yscale("log")
                # Plain numbers at the minor ticks too: a loss spans less than a decade, so most labels are minor.
                axis.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
                axis.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
            elif panel.y_format is not None:
                axis.yaxis.set_major_formatter(panel.y_format)
            axis.grid(alpha=0.3)
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize="small")
        figures[filename] = fig

    def plot(axis: Any, run: Run, lines: list[dict[str, Any]], key: str, x: str, label: str | None,
             **style: Any) -> None:
        xs, ys = run.series(lines, key, x)
        if xs:  # a line with no points would still take a place in the legend
            axis.plot(xs, ys, label=label, color=color[run.name], **style)

    def label(run: Run, what: str) -> str:
        return f"{run.name} {what}" if len(runs) > 1 else what

    eval_losses = sorted({key for run in runs for line in run.eval for key in line
                          if key.startswith("eval_") and key.endswith("_loss")})

    def losses(axis: Any, _: int) -> None:
        for run in runs:
            plot(axis, run, run.train, "train_loss", "tokens", label(run, "train"))
            for key in eval_losses:  # eval_loss, or eval_<name>_loss for each named eval set
                what = "eval" if key == "eval_loss" else key.removesuffix("_loss").replace("_", " ", 1)
                plot(axis, run, run.eval, key, "tokens", label(run, what), linestyle="--", marker="o", markersize=4)

    figure("loss.png", "Loss", [Panel("loss (nats/token)", "tokens", log_y)], losses)

    def learning_rates(axis: Any, _: int) -> None:
        for run in runs:
            # lr_<name> appear when several optimizers run; lr is then the first of them, so draw those instead.
            keys = sorted({key for line in run.train for key in line if key.startswith("lr_")}) or ["lr"]
            for style, key in zip(["-", "--", ":", "-."] * len(keys), keys):
                plot(axis, run, run.train, key, "step", label(run, key), linestyle=style)

    figure("lr.png", "Learning rate", [Panel("learning rate", "step")], learning_rates)

    has_mfu = any(run.series(run.train, "mfu")[0] for run in runs)
    throughput_keys = ["tokens_per_second"] + (["mfu"] if has_mfu else [])

    def throughput(axis: Any, index: int) -> None:
        for run in runs:
            plot(axis, run, run.train, throughput_keys[index], "step", run.name if len(runs) > 1 else None)

    figure("throughput.png", "Throughput", [Panel("tokens/s", "step", y_format=EngFormatter())]
           + ([Panel("MFU", "step", y_format=PercentFormatter(xmax=1))] if has_mfu else []), throughput)

    def grad_norms(axis: Any, _: int) -> None:
        for run in runs:
            plot(axis, run, run.train, "grad_norm", "step", run.name if len(runs) > 1 else None)

    figure("grad_norm.png", "Gradient norm", [Panel("grad norm, before clipping", "step", log_y)], grad_norms)

    metric_names = sorted({key.split("_", 1)[1] for run in runs for line in run.train + run.eval for key in line
                           if key.startswith(("train_", "eval_")) and key not in NOT_METRICS
                           and not (key.startswith("eval_") and key.endswith("_loss"))})
    if metric_names:
        def metrics(axis: Any, index: int) -> None:
            for run in runs:
                plot(axis, run, run.train, f"train_{metric_names[index]}", "tokens", label(run, "train"))
                plot(axis, run, run.eval, f"eval_{metric_names[index]}", "tokens", label(run, "eval"),
                     linestyle="--", marker="o", markersize=4)

        figure("metrics.png", "Metrics", [Panel(name, "tokens") for name in metric_names], metrics)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="timl plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dirs", nargs="+", type=Path, metavar="OUTPUT_DIR",
                        help="a run's output_dir, holding metrics.jsonl; several are drawn together for comparison")
    parser.add_argument("--out", type=Path, default=None, help="where the PNGs go (default: FIRST_OUTPUT_DIR/plots)")
    parser.add_argument("--dpi", type=int, default=100, help=f"pixels per inch; figures are {WIDTH:g} inches wide "
                                                             f"(default: 100)")
    parser.add_argument("--log_y", action="store_true", help="log scale for the loss and the gradient norm")
    args = parser.parse_args(argv)
    if args.dpi < 1:
        parser.error(f"--dpi must be positive, got {args.dpi}")
    try:
        runs = [load_run(path, name) for path, name in zip(args.output_dirs, run_names(args.output_dirs))]
        written = draw_figures(runs, args.out or args.output_dirs[0] / "plots", args.dpi, args.log_y)
    except MissingMatplotlib as error:
        print(error, file=sys.stderr)
        return 1
    except PlotError as error:
        print(f"timl plot: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
