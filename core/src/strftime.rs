//! Dates as Python's `strftime` writes them (C locale, UTC), for the `strftime_now` that
//! Hugging Face chat templates may call (Llama 3.x puts today's date in its system header).

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

const DAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
const MONTHS: [&str; 12] =
    ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];

/// A moment in UTC, broken down.
struct Civil {
    year: i64,
    month: u32,
    day: u32,
    weekday: usize,
    yday: u32,
    hour: u64,
    minute: u64,
    second: u64,
}

impl Civil {
    fn at(t: SystemTime) -> Civil {
        let secs = match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs_f64().ceil() as i64),
        };
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400) as u64);
        // Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
        let before: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let yday = before[month as usize - 1] + day + u32::from(leap && month > 2);
        Civil {
            year,
            month,
            day,
            weekday: (days + 4).rem_euclid(7) as usize,
            yday,
            hour: rem / 3600,
            minute: rem / 60 % 60,
            second: rem % 60,
        }
    }
}

/// `format` with the directives Python's `time.strftime` has in the C locale, at `t` in UTC.
/// An unknown directive is an error naming it (Python would pass it to the C library).
pub fn strftime(format: &str, t: SystemTime) -> Result<String, String> {
    let c = Civil::at(t);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(ch) = chars.next() {
        if ch != '%' {
            out.push(ch);
            continue;
        }
        let hour12 = if c.hour.is_multiple_of(12) { 12 } else { c.hour % 12 };
        // Writing into a String cannot fail.
        let _ = match chars.next() {
            Some('Y') => write!(out, "{}", c.year),
            Some('y') => write!(out, "{:02}", c.year.rem_euclid(100)),
            Some('m') => write!(out, "{:02}", c.month),
            Some('d') => write!(out, "{:02}", c.day),
            Some('e') => write!(out, "{:>2}", c.day),
            Some('j') => write!(out, "{:03}", c.yday),
            Some('H') => write!(out, "{:02}", c.hour),
            Some('I') => write!(out, "{hour12:02}"),
            Some('M') => write!(out, "{:02}", c.minute),
            Some('S') => write!(out, "{:02}", c.second),
            Some('p') => write!(out, "{}", if c.hour < 12 { "AM" } else { "PM" }),
            Some('A') => write!(out, "{}", DAYS[c.weekday]),
            Some('a') => write!(out, "{}", &DAYS[c.weekday][..3]),
            Some('B') => write!(out, "{}", MONTHS[c.month as usize - 1]),
            Some('b' | 'h') => write!(out, "{}", &MONTHS[c.month as usize - 1][..3]),
            Some('w') => write!(out, "{}", c.weekday),
            Some('F') => write!(out, "{}-{:02}-{:02}", c.year, c.month, c.day),
            Some('T') => write!(out, "{:02}:{:02}:{:02}", c.hour, c.minute, c.second),
            Some('%') => write!(out, "%"),
            Some(other) => return Err(format!("strftime directive %{other} is not supported")),
            None => return Err("strftime format ends with a lone %".into()),
        };
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// Against Python 3's `time.strftime(fmt, time.gmtime(secs))`.
    #[test]
    fn dates_are_written_as_python_writes_them() {
        let fmt = "%Y-%m-%d %H:%M:%S|%y %e %j %I%p|%a %A %b %B %h|%w %F %T %%";
        for (secs, want) in [
            (0, "1970-01-01 00:00:00|70  1 001 12AM|Thu Thursday Jan January Jan|4 1970-01-01 00:00:00 %"),
            (1_709_218_800, "2024-02-29 15:00:00|24 29 060 03PM|Thu Thursday Feb February Feb|4 2024-02-29 15:00:00 %"),
            (1_772_719_629, "2026-03-05 14:07:09|26  5 064 02PM|Thu Thursday Mar March Mar|4 2026-03-05 14:07:09 %"),
            (4_107_542_399, "2100-02-28 23:59:59|00 28 059 11PM|Sun Sunday Feb February Feb|0 2100-02-28 23:59:59 %"),
        ] {
            assert_eq!(strftime(fmt, at(secs)).as_deref(), Ok(want), "{secs}");
        }
        assert_eq!(strftime("%d %b %Y", at(1_721_952_000)).as_deref(), Ok("26 Jul 2024"));
        assert!(strftime("%Q", at(0)).expect_err("unknown directive").contains("%Q"));
        assert!(strftime("50%", at(0)).is_err());
    }
}
