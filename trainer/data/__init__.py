"""Training data: dataset types and sources (`sources`, `text`) and the grain pipeline (`pipeline`)."""
