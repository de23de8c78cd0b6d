//! The `rate-limiting` plugin: fixed windows per second, minute, hour, day, month and year.
//!
//! Like Kong, a request is refused when any window is already full, and only admitted requests
//! are counted. Counts live in this process (`policy: local`) or in Redis (`policy: redis`) so
//! several gateway instances share them; there, one Lua script reads, checks and increments
//! every window atomically (INCR then PEXPIRE on first use, one key per window). When Redis is
//! unreachable and `fault_tolerant` is set, requests pass and the failure is logged.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::Datelike;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

/// A window length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Period {
    Second,
    Minute,
    Hour,
    Day,
    Month,
    Year,
}

impl Period {
    fn name(self) -> &'static str {
        match self {
            Period::Second => "second",
            Period::Minute => "minute",
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Month => "month",
            Period::Year => "year",
        }
    }

    /// `X-RateLimit-Limit-<period>`. (The names are `const` blocks: `from_static` validates
    /// its argument, and outside a const context it would do so on every request.)
    fn limit_header(self) -> HeaderName {
        match self {
            Period::Second => const { HeaderName::from_static("x-ratelimit-limit-second") },
            Period::Minute => const { HeaderName::from_static("x-ratelimit-limit-minute") },
            Period::Hour => const { HeaderName::from_static("x-ratelimit-limit-hour") },
            Period::Day => const { HeaderName::from_static("x-ratelimit-limit-day") },
            Period::Month => const { HeaderName::from_static("x-ratelimit-limit-month") },
            Period::Year => const { HeaderName::from_static("x-ratelimit-limit-year") },
        }
    }

    /// `X-RateLimit-Remaining-<period>`.
    fn remaining_header(self) -> HeaderName {
        match self {
            Period::Second => const { HeaderName::from_static("x-ratelimit-remaining-second") },
            Period::Minute => const { HeaderName::from_static("x-ratelimit-remaining-minute") },
            Period::Hour => const { HeaderName::from_static("x-ratelimit-remaining-hour") },
            Period::Day => const { HeaderName::from_static("x-ratelimit-remaining-day") },
            Period::Month => const { HeaderName::from_static("x-ratelimit-remaining-month") },
            Period::Year => const { HeaderName::from_static("x-ratelimit-remaining-year") },
        }
    }

    /// The window containing `now` (UTC seconds): `[start, end)`.
    pub fn window(self, now: u64) -> (u64, u64) {
        let fixed = |len: u64| (now - now % len, now - now % len + len);
        match self {
            Period::Second => fixed(1),
            Period::Minute => fixed(60),
            Period::Hour => fixed(3600),
            Period::Day => fixed(86_400),
            Period::Month | Period::Year => {
                let day = chrono::DateTime::from_timestamp(now as i64, 0)
                    .unwrap_or_default()
                    .date_naive();
                let first = |year: i32, month: u32| {
                    chrono::NaiveDate::from_ymd_opt(year, month, 1)
                        .and_then(|d| d.and_hms_opt(0, 0, 0))
                        .map_or(0, |t| t.and_utc().timestamp() as u64)
                };
                let (year, month) = (day.year(), day.month());
                if self == Period::Month {
                    let (next_year, next_month) = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
                    (first(year, month), first(next_year, next_month))
                } else {
                    (first(year, 1), first(year + 1, 1))
                }
            }
        }
    }
}

/// What requests are counted together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LimitBy {
    Consumer,
    Credential,
    Ip,
    Service,
    Header(String),
    Path(String),
}

/// Where counts live.
#[derive(Debug, Clone)]
pub(crate) enum Policy {
    Local,
    Redis { url: String, timeout: Duration },
}

#[derive(Debug, Deserialize)]
struct RedisSpec {
    host: Option<String>,
    port: Option<u16>,
    password: Option<String>,
    timeout: Option<u64>,
    database: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct RateLimitSpec {
    second: Option<u64>,
    minute: Option<u64>,
    hour: Option<u64>,
    day: Option<u64>,
    month: Option<u64>,
    year: Option<u64>,
    #[serde(default = "default_limit_by")]
    limit_by: String,
    header_name: Option<String>,
    path: Option<String>,
    #[serde(default = "default_policy")]
    policy: String,
    #[serde(default = "yes")]
    fault_tolerant: bool,
    #[serde(default)]
    hide_client_headers: bool,
    redis_host: Option<String>,
    redis_port: Option<u16>,
    redis_password: Option<String>,
    redis_timeout: Option<u64>,
    redis_database: Option<u32>,
    /// Kong 3.6+ groups the Redis settings; both spellings are accepted.
    redis: Option<RedisSpec>,
    #[serde(default = "default_error_code")]
    error_code: u16,
    #[serde(default = "default_error_message")]
    error_message: String,
}

fn default_limit_by() -> String {
    "consumer".into()
}
fn default_policy() -> String {
    "local".into()
}
fn yes() -> bool {
    true
}
fn default_error_code() -> u16 {
    429
}
fn default_error_message() -> String {
    "API rate limit exceeded".into()
}

/// The plugin's `config` block, checked.
#[derive(Debug, Deserialize)]
#[serde(try_from = "RateLimitSpec")]
pub(crate) struct RateLimitConfig {
    /// Each configured window with its limit, shortest first.
    pub limits: Vec<(Period, u64)>,
    pub limit_by: LimitBy,
    pub policy: Policy,
    pub fault_tolerant: bool,
    pub hide_client_headers: bool,
    pub error_code: http::StatusCode,
    pub error_message: String,
}

impl TryFrom<RateLimitSpec> for RateLimitConfig {
    type Error = String;

    /// One piece: one spec turned into one RateLimitConfig; fields are moved out of `spec` as
    /// they are checked (header_name, path, the nested and flat redis settings), and the first
    /// error is returned as the plugin's single config message.
    fn try_from(spec: RateLimitSpec) -> Result<Self, String> {
        let limits: Vec<(Period, u64)> = [
            (Period::Second, spec.second),
            (Period::Minute, spec.minute),
            (Period::Hour, spec.hour),
            (Period::Day, spec.day),
            (Period::Month, spec.month),
            (Period::Year, spec.year),
        ]
        .into_iter()
        .filter_map(|(p, l)| l.map(|l| (p, l)))
        .collect();
        if limits.is_empty() {
            return Err("at least one of second, minute, hour, day, month, year must be set".into());
        }
        // Kong refuses a longer window with a smaller limit than a shorter one.
        for pair in limits.windows(2) {
            if pair[1].1 < pair[0].1 {
                return Err(format!(
                    "the limit for {} ({}) cannot be lower than the limit for {} ({})",
                    pair[1].0.name(),
                    pair[1].1,
                    pair[0].0.name(),
                    pair[0].1
                ));
            }
        }
        let limit_by = match spec.limit_by.as_str() {
            "consumer" => LimitBy::Consumer,
            "credential" => LimitBy::Credential,
            "ip" => LimitBy::Ip,
            "service" => LimitBy::Service,
            "header" => LimitBy::Header(
                spec.header_name
                    .ok_or("header_name: required when limit_by is \"header\"")?
                    .to_ascii_lowercase(),
            ),
            "path" => LimitBy::Path(spec.path.ok_or("path: required when limit_by is \"path\"")?),
            other => {
                return Err(format!(
                    "limit_by: {other:?} is not one of consumer, credential, ip, service, header, path"
                ))
            }
        };
        let policy = match spec.policy.as_str() {
            "local" => Policy::Local,
            "redis" => {
                let nested = spec.redis.unwrap_or(RedisSpec {
                    host: None,
                    port: None,
                    password: None,
                    timeout: None,
                    database: None,
                });
                let host = nested
                    .host
                    .or(spec.redis_host)
                    .ok_or("redis_host: required when policy is \"redis\"")?;
                let port = nested.port.or(spec.redis_port).unwrap_or(6379);
                let database = nested.database.or(spec.redis_database).unwrap_or(0);
                let password = nested.password.or(spec.redis_password);
                let timeout = Duration::from_millis(nested.timeout.or(spec.redis_timeout).unwrap_or(2000).max(1));
                let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
                Policy::Redis {
                    url: format!("redis://{auth}{host}:{port}/{database}"),
                    timeout,
                }
            }
            other => return Err(format!("policy: {other:?} is not supported (local or redis)")),
        };
        let error_code = http::StatusCode::from_u16(spec.error_code).map_err(|_| "error_code: not an HTTP status")?;
        Ok(RateLimitConfig {
            limits,
            limit_by,
            policy,
            fault_tolerant: spec.fault_tolerant,
            hide_client_headers: spec.hide_client_headers,
            error_code,
            error_message: spec.error_message,
        })
    }
}

/// What the limiter knows about a request, to pick its counter.
pub(crate) struct Identity<'a> {
    pub consumer: Option<&'a str>,
    pub credential: Option<&'a str>,
    pub ip: &'a str,
    pub service: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub path: &'a str,
}

impl RateLimitConfig {
    /// The counter identifier; like Kong, falls back to the client IP when the chosen
    /// attribute is missing.
    pub fn identifier<'a>(&self, who: &Identity<'a>) -> &'a str {
        let chosen = match &self.limit_by {
            LimitBy::Consumer => who.consumer,
            LimitBy::Credential => who.credential,
            LimitBy::Ip => None,
            LimitBy::Service => who.service,
            LimitBy::Header(name) => who.headers.get(name.as_str()).and_then(|v| v.to_str().ok()),
            LimitBy::Path(path) => (who.path == path).then_some(who.path),
        };
        chosen.unwrap_or(who.ip)
    }
}

/// The outcome for one request.
#[derive(Debug)]
pub(crate) struct Decision {
    /// Whether the request may go on.
    pub allowed: bool,
    /// Headers for the client (none with `hide_client_headers`), set straight on the
    /// response rather than gathered in a map of their own first.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// Why counting failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LimiterError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis is unreachable (retrying shortly)")]
    CoolingDown,
}

/// Counts stored in this process: key → (count, window end in UTC seconds).
#[derive(Default)]
struct LocalCounts {
    counts: HashMap<String, (u64, u64)>,
    operations: u64,
}

/// A cached Redis connection, or when to try connecting again.
enum RedisSlot {
    Connected(redis::aio::MultiplexedConnection),
    Down(Instant),
}

/// The counters of every rate-limiting attachment; survives config reloads.
pub(crate) struct Limiter {
    local: Mutex<LocalCounts>,
    redis: Mutex<HashMap<String, RedisSlot>>,
    script: redis::Script,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter").finish_non_exhaustive()
    }
}

/// Reads every window, refuses if one is full, else increments all and sets expiries.
/// Returns `{allowed, count1, count2, …}`.
const SCRIPT: &str = r#"
local n = #KEYS
local counts = {}
for i = 1, n do
  counts[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
end
for i = 1, n do
  if counts[i] >= tonumber(ARGV[i]) then
    table.insert(counts, 1, 0)
    return counts
  end
end
for i = 1, n do
  counts[i] = redis.call('INCR', KEYS[i])
  if counts[i] == 1 then
    redis.call('PEXPIRE', KEYS[i], ARGV[n + i])
  end
end
table.insert(counts, 1, 1)
return counts
"#;

/// How long to stop trying an unreachable Redis, so a dead Redis does not add its connect
/// timeout to every request.
const REDIS_COOL_DOWN: Duration = Duration::from_secs(1);

impl Default for Limiter {
    fn default() -> Self {
        Limiter {
            local: Mutex::default(),
            redis: Mutex::default(),
            script: redis::Script::new(SCRIPT),
        }
    }
}

impl Limiter {
    /// Counts a request against `conf` for `identifier` at `now` (UTC seconds).
    pub async fn check(
        &self,
        conf: &RateLimitConfig,
        namespace: &str,
        identifier: &str,
        now: u64,
    ) -> Result<Decision, LimiterError> {
        let mut windows: Vec<(Period, u64, u64)> = Vec::with_capacity(conf.limits.len());
        let mut keys: Vec<String> = Vec::with_capacity(conf.limits.len());
        for &(period, limit) in &conf.limits {
            let (start, end) = period.window(now);
            windows.push((period, limit, end));
            // `ratelimit:<namespace>:<identifier>:<period>:<window start>`, appended in one
            // allocation (`format!` here showed in the request path's profile).
            let mut key = String::with_capacity(40 + namespace.len() + identifier.len());
            for part in ["ratelimit:", namespace, ":", identifier, ":", period.name(), ":"] {
                key.push_str(part);
            }
            let _ = write!(key, "{start}");
            keys.push(key);
        }
        let (allowed, counts) = match &conf.policy {
            Policy::Local => self.count_locally(&keys, &windows, now),
            Policy::Redis { url, timeout } => self.count_in_redis(url, *timeout, &keys, &windows, now).await?,
        };
        Ok(Decision {
            allowed,
            headers: headers(conf, &windows, &counts, allowed, now),
        })
    }

    fn count_locally(&self, keys: &[String], windows: &[(Period, u64, u64)], now: u64) -> (bool, Vec<u64>) {
        // A poisoned lock only means another request panicked mid-count; the map is still usable.
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        local.operations += 1;
        if local.operations.is_multiple_of(1024) {
            local.counts.retain(|_, (_, end)| *end > now);
        }
        let mut counts: Vec<u64> = keys
            .iter()
            .map(|k| local.counts.get(k).map_or(0, |(c, _)| *c))
            .collect();
        if counts.iter().zip(windows).any(|(count, (_, limit, _))| count >= limit) {
            return (false, counts);
        }
        for ((key, count), (_, _, end)) in keys.iter().zip(counts.iter_mut()).zip(windows) {
            // The key is copied only when its window opens.
            match local.counts.get_mut(key) {
                Some(entry) => {
                    entry.0 += 1;
                    *count = entry.0;
                }
                None => {
                    local.counts.insert(key.clone(), (1, *end));
                    *count = 1;
                }
            }
        }
        (true, counts)
    }

    async fn count_in_redis(
        &self,
        url: &str,
        timeout: Duration,
        keys: &[String],
        windows: &[(Period, u64, u64)],
        now: u64,
    ) -> Result<(bool, Vec<u64>), LimiterError> {
        let mut connection = self.redis_connection(url, timeout).await?;
        let mut invocation = self.script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        for (_, limit, _) in windows {
            invocation.arg(*limit);
        }
        for (_, _, end) in windows {
            // Keep each key a second past its window so clock skew between instances is harmless.
            invocation.arg((end.saturating_sub(now) + 1) * 1000);
        }
        let result = tokio::time::timeout(timeout, invocation.invoke_async::<Vec<u64>>(&mut connection)).await;
        let reply = match result {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => {
                self.mark_down(url);
                return Err(e.into());
            }
            Err(_) => {
                self.mark_down(url);
                return Err(LimiterError::Timeout(timeout));
            }
        };
        let allowed = reply.first() == Some(&1);
        Ok((allowed, reply.into_iter().skip(1).collect()))
    }

    async fn redis_connection(
        &self,
        url: &str,
        timeout: Duration,
    ) -> Result<redis::aio::MultiplexedConnection, LimiterError> {
        {
            let slots = self.redis.lock().unwrap_or_else(|e| e.into_inner());
            match slots.get(url) {
                Some(RedisSlot::Connected(connection)) => return Ok(connection.clone()),
                Some(RedisSlot::Down(until)) if Instant::now() < *until => return Err(LimiterError::CoolingDown),
                _ => {}
            }
        }
        let connect = async {
            let client = redis::Client::open(url)?;
            client.get_multiplexed_async_connection().await
        };
        match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(connection)) => {
                let mut slots = self.redis.lock().unwrap_or_else(|e| e.into_inner());
                slots.insert(url.to_string(), RedisSlot::Connected(connection.clone()));
                Ok(connection)
            }
            Ok(Err(e)) => {
                self.mark_down(url);
                Err(e.into())
            }
            Err(_) => {
                self.mark_down(url);
                Err(LimiterError::Timeout(timeout))
            }
        }
    }

    fn mark_down(&self, url: &str) {
        let mut slots = self.redis.lock().unwrap_or_else(|e| e.into_inner());
        slots.insert(url.to_string(), RedisSlot::Down(Instant::now() + REDIS_COOL_DOWN));
    }
}

/// Kong's headers: per-window `X-RateLimit-*`, the draft-standard `RateLimit-*` for the
/// window closest to its limit, and `Retry-After` when refused.
fn headers(
    conf: &RateLimitConfig,
    windows: &[(Period, u64, u64)],
    counts: &[u64],
    allowed: bool,
    now: u64,
) -> Vec<(HeaderName, HeaderValue)> {
    if conf.hide_client_headers {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(2 * windows.len() + 4);
    // (remaining, limit, seconds to reset) of the window reported in `RateLimit-*`.
    let mut tightest: Option<(u64, u64, u64)> = None;
    for ((period, limit, end), count) in windows.iter().zip(counts) {
        let remaining = limit.saturating_sub(*count);
        let reset = end.saturating_sub(now).max(1);
        out.push((period.limit_header(), HeaderValue::from(*limit)));
        out.push((period.remaining_header(), HeaderValue::from(remaining)));
        // The first window with the fewest requests left; when refused, that is a full one.
        if tightest.is_none_or(|(r, _, _)| remaining < r) {
            tightest = Some((remaining, *limit, reset));
        }
    }
    if let Some((remaining, limit, reset)) = tightest {
        out.push((
            const { HeaderName::from_static("ratelimit-limit") },
            HeaderValue::from(limit),
        ));
        out.push((
            const { HeaderName::from_static("ratelimit-remaining") },
            HeaderValue::from(remaining),
        ));
        out.push((
            const { HeaderName::from_static("ratelimit-reset") },
            HeaderValue::from(reset),
        ));
        if !allowed {
            out.push((http::header::RETRY_AFTER, HeaderValue::from(reset)));
        }
    }
    out
}

impl super::Plugin for RateLimitConfig {
    const NAME: &'static str = "rate-limiting";

    fn parse(config: serde_yaml::Value) -> Result<Self, Vec<String>> {
        super::typed(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(yaml: &str) -> RateLimitConfig {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn windows_align_to_the_calendar() {
        // 2024-02-29T13:45:30Z
        let now = 1_709_214_330;
        assert_eq!(Period::Second.window(now), (now, now + 1));
        assert_eq!(Period::Minute.window(now), (1_709_214_300, 1_709_214_360));
        assert_eq!(Period::Hour.window(now), (1_709_211_600, 1_709_215_200));
        assert_eq!(Period::Day.window(now), (1_709_164_800, 1_709_251_200));
        // February 2024 has 29 days.
        assert_eq!(Period::Month.window(now), (1_706_745_600, 1_709_251_200));
        assert_eq!(Period::Year.window(now), (1_704_067_200, 1_735_689_600));
        // December rolls over into the next year.
        let new_years_eve = 1_735_646_400; // 2024-12-31T12:00:00Z
        assert_eq!(Period::Month.window(new_years_eve), (1_733_011_200, 1_735_689_600));
    }

    #[tokio::test]
    async fn refuses_after_the_limit_and_resets_with_the_window() {
        let limiter = Limiter::default();
        let conf = conf("{minute: 3}");
        let header = |decision: &Decision, name: &str| {
            let found = decision.headers.iter().find(|(n, _)| n == name);
            found.map(|(_, v)| v.to_str().unwrap().to_string())
        };
        let now = 1_709_214_330;
        for expected_remaining in [2, 1, 0] {
            let decision = limiter.check(&conf, "global", "1.2.3.4", now).await.unwrap();
            assert!(decision.allowed);
            assert_eq!(
                header(&decision, "x-ratelimit-remaining-minute"),
                Some(expected_remaining.to_string())
            );
        }
        let refused = limiter.check(&conf, "global", "1.2.3.4", now).await.unwrap();
        assert!(!refused.allowed);
        assert_eq!(header(&refused, "retry-after").as_deref(), Some("30"));
        assert_eq!(header(&refused, "ratelimit-limit").as_deref(), Some("3"));
        assert!(limiter.check(&conf, "global", "5.6.7.8", now).await.unwrap().allowed);
        assert!(
            limiter
                .check(&conf, "global", "1.2.3.4", now + 30)
                .await
                .unwrap()
                .allowed
        );
    }

    #[test]
    fn config_problems_are_named() {
        assert!(serde_yaml::from_str::<RateLimitConfig>("{}").is_err());
        assert!(serde_yaml::from_str::<RateLimitConfig>("{second: 10, minute: 5}").is_err());
        assert!(serde_yaml::from_str::<RateLimitConfig>("{minute: 5, limit_by: header}").is_err());
        assert!(serde_yaml::from_str::<RateLimitConfig>("{minute: 5, policy: redis}").is_err());
        let redis = conf("{minute: 5, policy: redis, redis_host: 10.0.0.1, redis_database: 2}");
        assert!(matches!(redis.policy, Policy::Redis { ref url, .. } if url == "redis://10.0.0.1:6379/2"));
    }
}
