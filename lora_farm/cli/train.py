"""lorafarm train commands."""
