//! The UTC calendar: which day and month a time falls in.
//!
//! Usage files are per UTC month and budgets per UTC day or month; both
//! count from the same days since the epoch.

/// Year, month (1-12) and day (1-31) of the `days`th day after 1970-01-01,
/// in the proleptic Gregorian calendar (after H. Hinnant's `civil_from_days`).
pub fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}
