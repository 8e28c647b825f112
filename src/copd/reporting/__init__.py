"""What a person reads: the run report, the comparison report, their plots, and progress on the terminal."""
