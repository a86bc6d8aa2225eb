"""Stage 6, the report: the folder of CSVs, report.md, table.tex and plots (:mod:`.write`), its headline table
and the sections that are not one study's."""
