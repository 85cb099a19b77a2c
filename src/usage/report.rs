//! Totals read from usage files, for `gptbalance usage`.
