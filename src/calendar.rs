//! The UTC calendar: which day and month a time falls in.
//!
//! Usage files are per UTC month and budgets per UTC day or month; both
//! count from the same days since the epoch. Usage rows stamp their time
//! with [`rfc3339_millis`], from the same days.

use std::time::{SystemTime, UNIX_EPOCH};

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

/// `t` as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC), as humantime writes it, into
/// a buffer on the stack: each row's stamp, formatted once when the row is
/// packed. Times before 1970 or after 9999 are clamped to those bounds.
pub fn rfc3339_millis(t: SystemTime) -> [u8; 24] {
    const LAST: u64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z
    let ms = t.duration_since(UNIX_EPOCH).map_or(0, |d| {
        u64::try_from(d.as_millis()).unwrap_or(LAST).min(LAST)
    });
    let (days, ms_of_day) = (ms / 86_400_000, ms % 86_400_000);
    let (year, month, day) = civil_from_days(days);
    let mut out = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, ms_of_day / 3_600_000);
    put(14, 2, ms_of_day / 60_000 % 60);
    put(17, 2, ms_of_day / 1000 % 60);
    put(20, 3, ms_of_day % 1000);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The timestamps written are humantime's, digit for digit, from the
    /// epoch to the year 9999, and clamped beyond.
    #[test]
    fn row_timestamps_match_humantime() {
        let mut rng = fastrand::Rng::with_seed(7);
        let last = 253_402_300_799_999u64;
        let mut cases: Vec<u64> = (0..20_000).map(|_| rng.u64(0..=last)).collect();
        cases.extend([0, 999, 86_399_999, 951_782_400_000, 4_107_542_399_999, last]);
        for ms in cases {
            let t = UNIX_EPOCH + std::time::Duration::from_millis(ms);
            let want = humantime::format_rfc3339_millis(t).to_string();
            assert_eq!(
                std::str::from_utf8(&rfc3339_millis(t)).unwrap(),
                want,
                "{ms}"
            );
        }
        let before = UNIX_EPOCH - std::time::Duration::from_secs(1);
        assert_eq!(&rfc3339_millis(before), b"1970-01-01T00:00:00.000Z");
        let after = UNIX_EPOCH + std::time::Duration::from_millis(last + 5000);
        assert_eq!(&rfc3339_millis(after), b"9999-12-31T23:59:59.999Z");
    }
}
