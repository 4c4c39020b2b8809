"""Quality: ranking metrics, benchmark files, evaluation, calibration, canaries, drift, reports."""
