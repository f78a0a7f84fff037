"""build-dpo-pairs: its settings (`config`), the judge stage (`judging`) and the pairs stage (`pairs`)."""
