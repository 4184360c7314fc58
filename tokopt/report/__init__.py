"""Reports: report.json, report.md, the terminal table and the HTML page."""
