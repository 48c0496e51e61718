//! `braid daytime`: the daytime service (RFC 867): sends the date and time
//! as one line of text, then closes; a datagram gets one back.

use std::time::{SystemTime, UNIX_EPOCH};

use braid::datagram::{DatagramProtocol, DatagramTransport, SharedDatagram};
use braid::protocol::{IntoFactory, Protocol};
use braid::{Address, Transport};

use super::{Common, Serve};

/// Arguments of `braid daytime`.
#[derive(clap::Args, Clone)]
pub struct Args {
    /// Where to listen, as an endpoint; repeatable (default tcp:13).
    #[arg(long, value_name = "ENDPOINT", default_value = "tcp:13")]
    listen: Vec<String>,
}

const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
const MONTHS: [&str; 12] =
    ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

/// The time as RFC 867 suggests (any readable form): RFC 5322's, in UTC.
pub fn daytime(now: SystemTime) -> String {
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = DAYS[days.rem_euclid(7) as usize];
    format!("{weekday}, {day:02} {} {year} {h:02}:{m:02}:{s:02} +0000\r\n", MONTHS[(month - 1) as usize])
}

/// Sends the time and closes.
struct Daytime {
    transport: Option<DatagramTransport>,
}

impl Protocol for Daytime {
    fn connection_made(&mut self, t: Transport) {
        t.write(daytime(SystemTime::now()).as_bytes());
        t.lose_connection();
    }
    fn data_received(&mut self, _data: &[u8]) {}
}

impl DatagramProtocol for Daytime {
    fn make_connection(&mut self, t: DatagramTransport) {
        self.transport = Some(t);
    }
    fn datagram_received(&mut self, _data: &[u8], from: &Address) {
        if let Some(t) = &self.transport {
            let _ = t.write(daytime(SystemTime::now()).as_bytes(), Some(from));
        }
    }
}

/// Serves daytime until SIGINT or SIGTERM.
pub fn run(common: Common, args: Args) -> Result<(), String> {
    let what = Serve {
        name: "daytime",
        streams: Some((|| Daytime { transport: None }).into_shared()),
        datagrams: Some(SharedDatagram::new(Daytime { transport: None }).erase()),
        over: "",
    };
    super::serve(common, &args.listen, what)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn known_dates() {
        assert_eq!(daytime(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 +0000\r\n");
        let t = UNIX_EPOCH + Duration::from_secs(1_796_213_402);
        assert_eq!(daytime(t), "Wed, 02 Dec 2026 12:10:02 +0000\r\n");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(daytime(leap), "Tue, 29 Feb 2000 00:00:00 +0000\r\n");
    }
}
