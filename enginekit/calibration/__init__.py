"""Static INT8 calibration: one streaming pass over representative data fills a bounded
histogram per activation tensor; every range method (min-max, percentile, KL-entropy, MSE) is
computed from those same histograms and saved as a reusable CalibrationTable."""
