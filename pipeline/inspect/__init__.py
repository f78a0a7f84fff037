"""`lightgen-data inspect`: the page (`page`), sampling a stage output (`read`), HTML helpers and stage sections."""
