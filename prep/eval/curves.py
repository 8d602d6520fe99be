"""Training curves for the report: PNG plots of what a run logged, read from its trainer_state.json.

transformers' Trainer keeps every logged step in `trainer_state.json` (`log_history`: one dict per
log call, with `step`). Stage two (custom_losses.train.distill) writes it to its output_dir at the end of
training; Axolotl (stage one) leaves it in each checkpoint-N/, and the last one holds every step, so a
training folder is read from OUTPUT_DIR/trainer_state.json, else from its highest complete checkpoint.
One point per logged step, nothing smoothed or dropped. `python -m launch.score --curves NAME=PATH`
writes them beside the score table.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

from prep.jsonio import InputError, write_bytes_atomic

STATE_NAME = "trainer_state.json"
# The panels, each with the logged keys it shows when a run has them: stage one logs loss and
# eval_loss; stage two's trainer (custom_losses.kd.trainer) adds its kd_loss, ce_loss and
# diseases_weight_share per step, and the same with an eval_ prefix when it evaluates.
PANELS = (
    ("loss", ("loss", "eval_loss")),
    ("KD and CE loss", ("kd_loss", "ce_loss", "eval_kd_loss", "eval_ce_loss")),
    ("diseases' share of the loss weight", ("diseases_weight_share", "eval_diseases_weight_share")),
)
KEYS = tuple(key for _, keys in PANELS for key in keys)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def trainer_state_path(path: str | Path) -> Path:
    """PATH itself (a trainer_state.json) or, for a training folder, its own or its last checkpoint's."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise InputError(path, None, f"not found: give a {STATE_NAME} or the training output folder holding one")
    if (path / STATE_NAME).is_file():
        return path / STATE_NAME
    checkpoints = [folder for folder in path.glob("checkpoint-*")
                   if folder.name.split("-")[-1].isdigit() and (folder / STATE_NAME).is_file()]
    if not checkpoints:
        raise InputError(path, None, f"no {STATE_NAME} in the folder nor in a checkpoint-N/ under it (has training "
                                     f"logged and saved a step?)")
    return max(checkpoints, key=lambda folder: int(folder.name.split("-")[-1])) / STATE_NAME


def read_log_history(path: str | Path) -> tuple[Path, list[dict]]:
    """(the trainer_state.json read, its log_history); InputError when it is not one."""
    state_path = trainer_state_path(path)
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(state_path, None, f"not valid JSON ({err})") from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list) or not all(isinstance(entry, dict) for entry in history):
        raise InputError(state_path, None, "no log_history list: not a transformers trainer_state.json", "log_history")
    return state_path, history


def series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of every log entry holding KEY, in logged order."""
    entries = [entry for entry in history if key in entry]
    return [entry.get("step", index) for index, entry in enumerate(entries)], [entry[key] for entry in entries]


def plot_curves(history: list[dict], title: str, path: str | Path) -> dict[str, tuple[list[float], list[float]]]:
    """Write a PNG of every PANELS key HISTORY holds; returns each plotted line's (x, y) data, read back from the
    figure, by key: one point per log entry holding the key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(label, [key for key in keys if any(key in entry for entry in history)]) for label, keys in PANELS]
    panels = [(label, keys) for label, keys in panels if keys]
    if not panels:
        raise InputError(path, None, f"{title}: nothing to plot, the log history has none of {', '.join(KEYS)}")
    figure, axes = plt.subplots(len(panels), 1, figsize=(7, 2.8 * len(panels)), sharex=True, squeeze=False)
    plotted = {}
    for (label, keys), axis in zip(panels, axes[:, 0]):
        for key in keys:
            # Eval points are few (one per eval): markers keep a single one visible.
            (line,) = axis.plot(*series(history, key), label=key, marker="o" if key.startswith("eval_") else None,
                                markersize=3)
            plotted[key] = ([float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()])
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    axes[-1, 0].set_xlabel("training step")
    axes[0, 0].set_title(title, fontsize=9)
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=110)
    plt.close(figure)
    write_bytes_atomic(path, image.getvalue())
    return plotted


def parse_curve_specs(specs: list[str]) -> dict[str, Path]:
    """NAME=PATH pairs (--curves) -> {name: path}; ValueError naming the bad one."""
    found: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path or not NAME_PATTERN.fullmatch(name):
            raise ValueError(f"--curves {spec!r}: expected NAME=PATH, NAME of letters, digits, '.', '_' or '-' "
                             f"(e.g. sft=runs/stage1/sft)")
        if name in found:
            raise ValueError(f"--curves names '{name}' twice")
        found[name] = Path(path)
    return found


def read_curves(curves: dict[str, Path]) -> dict[str, tuple[Path, list[dict]]]:
    """Each NAME: PATH's (trainer_state.json, log_history), checked to hold something to plot."""
    histories = {name: read_log_history(path) for name, path in curves.items()}
    for state_path, history in histories.values():
        if not any(key in entry for entry in history for key in KEYS):
            raise InputError(state_path, None, f"nothing to plot: no log entry has any of {', '.join(KEYS)} "
                                               f"(has training logged a step?)", "log_history")
    return histories


def curve_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / f"curves-{name}.png"


def write_curves(histories: dict[str, tuple[Path, list[dict]]], out_dir: str | Path) -> dict[str, Path]:
    """curve_path(OUT_DIR, NAME) for each of read_curves' histories; returns the paths by name."""
    written = {}
    for name, (state_path, history) in histories.items():
        written[name] = curve_path(out_dir, name)
        source = f"{state_path.parent.name}/{state_path.name}"
        plot_curves(history, f"{name} training: {len(history)} log entries ({source})", written[name])
    return written
