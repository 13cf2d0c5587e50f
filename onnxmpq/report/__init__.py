"""What a run reports: the `Report` and its totals (`summary`), the report folder's HTML page
(`html`) and its plots (`plots`). Rendering only: every number shown was computed by the pipeline."""
