"""One self-contained HTML page per run: config, final metrics, curves and (if given) the analysis figures.

Pictures are embedded as base64 ``data:`` URIs and there is no script or
style sheet from elsewhere, so the file reads offline and can be mailed or
archived alone.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from deit.analysis import figures

ANALYSIS_FIGURES = (
    ("agreement.png", "Agreement between predictors"),
    ("token_cosine.png", "Class and distillation tokens, layer by layer"),
    ("attention.png", "Attention of the two tokens (last block and rollout)"),
    ("confusion.png", "Confusion matrix"),
)


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure_uri(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return _png_uri(buffer.getvalue())


def _table(rows: list[list[str]]) -> str:
    head, *body = rows
    cells = "".join(f"<th>{html.escape(cell)}</th>" for cell in head)
    lines = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in body)
    return f"<table><tr>{cells}</tr>{lines}</table>"


def _final_metrics(record: dict[str, Any]) -> str:
    rows = [["prediction", "top-1 (%)", "top-5 (%)"]]
    for head in ("", "cls_", "dist_", "avg_logits_", "softmax_sum_"):
        if f"{head}acc1" in record["val"]:
            name = head.rstrip("_") or "prediction"
            rows.append([name, f"{record['val'][f'{head}acc1']:.2f}", f"{record['val'][f'{head}acc5']:.2f}"])
    return _table(rows)


def build_report(run_dir: str | Path, analysis_dir: str | Path | None = None) -> str:
    """The HTML text of the report of ``run_dir`` (a deit train output directory)."""
    run = Path(run_dir)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    parts = [f"<h1>deit run: {html.escape(run.name)}</h1>"]
    evaluated = [record for record in records if "val" in record]  # --eval-interval skips some epochs
    if evaluated:
        parts += [f"<h2>After epoch {evaluated[-1]['epoch']}</h2>", _final_metrics(evaluated[-1])]
        parts += [
            "<h2>Training curves</h2>",
            f'<img alt="curves" src="{_figure_uri(figures.curves_figure({run.name: records}))}">',
        ]
    if analysis_dir is not None:
        parts += _analysis_section(Path(analysis_dir))
    config = run / "config.yaml"
    if config.is_file():
        parts += ["<h2>Config</h2>", f"<pre>{html.escape(config.read_text())}</pre>"]
    return PAGE.format(title=html.escape(run.name), body="\n".join(parts))


def _analysis_section(folder: Path) -> list[str]:
    result = json.loads((folder / "analysis.json").read_text())
    parts = ["<h2>Analysis</h2>"]
    names = result["agreement"]["predictors"]
    rows = [["agreement (%)", *names]] + [
        [a, *(f"{v:.2f}" for v in row)] for a, row in zip(names, result["agreement"]["percent"], strict=True)
    ]
    parts.append(_table(rows))
    if "token_cosine" in result:
        cosines = result["token_cosine"]
        parts.append(f"<p>cosine of the class and distillation tokens: input {cosines['input']:.2f}, output "
                     f"{cosines['output']:.2f}; heads' weights {result['head_weight_cosine']:.2f}</p>")  # fmt: skip
    for name, caption in ANALYSIS_FIGURES:
        if (folder / name).is_file():
            uri = _png_uri((folder / name).read_bytes())
            parts.append(f'<figure><img alt="{name}" src="{uri}"><figcaption>{caption}</figcaption></figure>')
    return parts


# the script only reports, for tests and curious readers, whether every picture decoded
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.2em .6em;text-align:right}} img{{max-width:100%}}</style></head>
<body>
{body}
<script>
window.addEventListener("load", () => {{
  const images = Array.from(document.images);
  const loaded = images.filter((image) => image.complete && image.naturalWidth > 0).length;
  document.body.setAttribute("data-images", loaded + "/" + images.length);
}});
</script>
</body></html>
"""
