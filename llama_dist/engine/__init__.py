"""What turns a loaded model into generated tokens: the decode step (eager or compiled), sampling and the
offline generation loop."""
