"""The run's control: the training session, which process writes and the writer lock,
pre-emption signals and the wall-clock limit."""
