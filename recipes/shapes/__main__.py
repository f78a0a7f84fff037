"""`python -m recipes.shapes`: the demo, or with --ablation the data ablation."""

from recipes.shapes.cli import main

if __name__ == "__main__":
    main()
