"""Tables a person reads: evaluation results and data set inspections (the command line and the
demo print them)."""

from __future__ import annotations

from rich.table import Table

from polymodal.progress import console


def format_table(results: dict[str, dict[str, float]]):
    table = Table(title="evaluation")
    table.add_column("metric")
    splits = list(results)
    for s in splits:
        table.add_column(s, justify="right")
    names = list(dict.fromkeys(k for r in results.values() for k, v in r.items() if isinstance(v, (int, float))))
    for name in names:
        cells = []
        for s in splits:
            v = results[s].get(name)
            whole = name == "samples" or name.endswith("questions")
            cells.append("" if v is None else (f"{int(v)}" if whole else f"{v:.3f}"))
        table.add_row(name, *cells)
    return table


def print_inspection(report) -> None:
    modalities = sorted({m for c in report.per_modality.values() for m in c})
    table = Table(title=f"{report.samples} samples")
    for header in ["split", "samples", *modalities]:
        table.add_column(header, justify="right" if header != "split" else "left")
    for split, count in sorted(report.per_split.items()):
        table.add_row(split, str(count), *[str(report.per_modality[split].get(m, 0)) for m in modalities])
    console.print(table)
    if report.bad:
        console.print(f"[yellow]{len(report.bad)} bad samples:[/yellow]")
        for b in report.bad[:50]:
            console.print(f"  {b.source}: {b.reason}")
    else:
        console.print("no bad samples found")
    if report.sheet:
        console.print(f"contact sheet: {report.sheet}")
