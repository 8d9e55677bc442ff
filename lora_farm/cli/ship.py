"""lorafarm ship commands."""
