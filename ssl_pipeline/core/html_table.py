"""Tables as HTML fragments: Snakemake's --report shows an HTML result inline (a CSV only as a download),
and its front page (workflow/report/workflow.rst) embeds the same fragments, so the HTML report shows
the claims and label-efficiency tables without a click."""
import html

from ssl_pipeline.core.artifacts import write_text

# Scoped to these tables: the fragment also lands inside Snakemake's own page.
STYLE = ("table.results{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}"
         "table.results th,table.results td{border:1px solid #ccc;padding:3px 6px;text-align:left;"
         "vertical-align:top}table.results th{background:#f3f3f3}table.results td.number{text-align:right}")


def cell(value) -> str:
    text = "" if value is None else str(value)
    number = text.replace(".", "", 1).replace("-", "", 1).replace("e", "", 1).isdigit()
    return f'<td class="number">{html.escape(text)}</td>' if number else f"<td>{html.escape(text)}</td>"


def write_html_table(path, title: str, columns: list, rows: list, note: str = "") -> None:
    """rows: dicts (or sequences) in the order of `columns`."""
    body = "\n".join("<tr>" + "".join(cell(row[c] if isinstance(row, dict) else row[i])
                                      for i, c in enumerate(columns)) + "</tr>" for row in rows)
    slug = html.escape(title.lower().replace(" ", "-"))
    write_text(path, f"<meta charset=\"utf-8\"><style>{STYLE}</style>\n<h3>{html.escape(title)}</h3>\n"
                     f"<p>{html.escape(note)}</p>\n<table class=\"results\" id=\"{slug}\">\n<thead><tr>"
                     + "".join(f"<th>{html.escape(c)}</th>" for c in columns)
                     + f"</tr></thead>\n<tbody>\n{body}\n</tbody></table>\n")
