#!/usr/bin/env python3
"""Write the reference pages that are derived from the code: docs/reference/settings.md (every setting of
`headalloc compress`, by stage, with its flag, default, preset values and help) and docs/reference/strategies.md
(the strategy registry). A test fails when they differ from what this script writes; run it after changing a
setting or a strategy.

    python scripts/gen_docs.py          # write
    python scripts/gen_docs.py --check  # exit 1 if a page is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PAGES = {"settings": ROOT / "docs" / "reference" / "settings.md",
         "strategies": ROOT / "docs" / "reference" / "strategies.md"}


from headalloc.io import atomic_write_text  # noqa: E402


def _cell(v) -> str:
    return "" if v is None else f"`{v}`"


def settings_page() -> str:
    from headalloc.compression.settings import (BY_BUDGET_KIND, FLAGS, GROUPS, MODEL_HELP, PRESETS, CompressConfig,
                                                preset)

    default = CompressConfig()
    presets = {n: preset(n) for n in PRESETS if n != "default"}
    out = ["# Settings of `headalloc compress`", "",
           "Generated from `src/headalloc/compression/settings.py` by `python scripts/gen_docs.py`; do not edit.",
           "Every setting is a flag (`--kd-steps`), a keyword of `headalloc.compress` (`kd_steps=`) and a field of "
           "its stage's dataclass (`config.kd.steps`). A preset column shows a value only where the preset differs "
           "from the default.", ""]
    by_title: dict[str, list[str]] = {}
    for name, (g, f) in FLAGS.items():
        title = "model" if g is None else f"{GROUPS[g].TITLE} (`{g}`: `{GROUPS[g].__name__}`)"
        by_title.setdefault(title, []).append(name)
    for title, names in by_title.items():
        out += [f"## {title}", "", "| flag | field | default | " + " | ".join(f"--preset {p}" for p in presets)
                + " | what it sets |", "|---|---|---|" + "---|" * len(presets) + "---|"]
        for name in names:
            g, f = FLAGS[name]
            d = default.get(name)
            shown = _cell(d) if d is not None or name not in BY_BUDGET_KIND["params"] else \
                "by budget kind: " + ", ".join(f"{k} `{v[name]}`" for k, v in BY_BUDGET_KIND.items())
            pv = [_cell(p.get(name)) if p.get(name) != d else "" for p in presets.values()]
            help_ = MODEL_HELP if f is None else f.metadata["help"]
            choices = None if f is None else f.metadata.get("choices")
            if choices:
                help_ += " (one of " + ", ".join(f"`{c}`" for c in choices) + ")"
            field = "`model`" if g is None else f"`{g}.{f.name}`"
            out.append(f"| `--{name.replace('_', '-')}` | {field} | {shown} | " + " | ".join(pv)
                       + f" | {help_.replace('|', '/')} |")
        out.append("")
    return "\n".join(out)


def strategies_page() -> str:
    from headalloc.compression.planning import AUTO, AUTO_DESCRIPTION, STRATEGIES

    out = ["# Strategies", "",
           "Generated from the registry (`headalloc.compression.planning.STRATEGIES`) by `python scripts/gen_docs.py`; "
           "do not edit.", "",
           "| strategy | defined in | needs calibration | keys/values through latents | what it does |",
           "|---|---|---|---|---|",
           f"| `{AUTO}` (default) | `planning/registry.py` | | | {AUTO_DESCRIPTION} |"]
    for name, s in STRATEGIES.items():
        mod = s.fn.__module__.replace("headalloc.compression.", "").replace(".", "/") + ".py"
        out.append(f"| `{name}` | `{mod}` | {'yes' if s.needs_calibration else 'no'} | "
                   f"{'yes' if s.latent else ''} | {s.description} |")
    return "\n".join(out) + "\n"


def pages() -> dict[Path, str]:
    return {PAGES["settings"]: settings_page(), PAGES["strategies"]: strategies_page()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args(argv)
    stale = []
    for path, text in pages().items():
        if a.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path)
        else:
            atomic_write_text(path, text)  # (a killed run leaves the old page, never half of a new one)
            print(f"wrote {path.relative_to(ROOT)}")
    for p in stale:
        print(f"{p.relative_to(ROOT)} is stale: run python scripts/gen_docs.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
