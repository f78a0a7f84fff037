"""lightgen package."""
