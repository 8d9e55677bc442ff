"""lorafarm farm commands."""
