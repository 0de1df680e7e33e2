"""The batch mode: a jobs file in, a results file out (`dispatcher run`)."""
