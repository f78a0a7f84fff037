"""The LightGen data pipeline (`lightgen-data`), by role: `core/` (what every stage shares: the Stage class, the
runner, executors, storage, schemas), `io/` (reading inputs), `models/` (teachers, judges, encoders), `stages/` (one
module per stage, and the registry the commands are generated from), `inspect/` (HTML pages of stage outputs)."""
