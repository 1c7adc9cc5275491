//! Replicas' shared state in Redis (`[cluster] redis_url`): several proxies behind one load
//! balancer share the nonce replay cache, the fleet-sync lease and the fleet list, WeChat Pay's
//! per-merchant limits (the device list's pacing and daily budget, the terminals' ceilings and
//! per-device buckets) and the fleet view's records. Without `[cluster]` none of this runs: one
//! proxy keeps all of it in memory and its sled store.
//!
//! Owns: the connection (made lazily, so a proxy starts while Redis is down; redis-rs's
//! connection manager reconnects; every call is bounded by `timeout`), the key scheme under one
//! prefix per merchant, the atomic scripts (set-if-absent, the day's budget, GCRA on Redis's
//! clock, the renewable lease, a field's maximum), and whether Redis answers now: one journal
//! line when it stops answering and one when it answers again, and the state `/healthz` shows.
//! It must not decide what a failure means: callers refuse (a nonce that cannot be checked is
//! never accepted) or keep what they hold. It imports nothing of the proxy's: callers encode
//! their own records.
//!
//! No secret is ever written to Redis: keys and values are device ids, nonces, counts, times,
//! the fleet list (serials and statuses) and the fleet view's records (terminals' reports).

use std::sync::Mutex;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands as _, Script};

use crate::sync::lock;

/// Default time a fleet-sync lease lasts unless renewed: a dead holder is replaced within it.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Default bound on one call to Redis (connecting included).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// `[cluster]`, validated.
#[derive(Clone)]
pub struct ClusterConfig {
    info: redis::ConnectionInfo,
    /// The URL without its password, for logs and `/healthz`.
    pub redacted_url: String,
    /// The CA that signed a `rediss://` server's certificate, when not a public one.
    pub ca_pem: Option<String>,
    /// Every key starts with this and a colon.
    pub prefix: String,
    pub lease: Duration,
    pub timeout: Duration,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("url", &self.redacted_url)
            .field("prefix", &self.prefix)
            .field("lease", &self.lease)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl ClusterConfig {
    /// Parses `url` (`redis://[user[:password]@]host:port[/db]` or `rediss://…`), with a
    /// `password` (from `password_file`) and `username` replacing the URL's.
    pub fn new(
        url: &str,
        username: Option<&str>,
        password: Option<&str>,
        ca_pem: Option<String>,
        prefix: String,
        lease: Duration,
        timeout: Duration,
    ) -> Result<Self, String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
        if !matches!(parsed.scheme(), "redis" | "rediss") {
            return Err("must be a redis:// or rediss:// URL".into());
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err("names no host".into());
        }
        if ca_pem.is_some() && parsed.scheme() != "rediss" {
            return Err("ca_file is set, but the URL is not rediss:// (TLS)".into());
        }
        let mut redacted = parsed.clone();
        if redacted.password().is_some() {
            let _ = redacted.set_password(Some("***"));
        }
        let info = redis::IntoConnectionInfo::into_connection_info(url)
            .map_err(|e| format!("not a Redis URL: {e}"))?;
        let mut settings = info.redis_settings().clone();
        if let Some(user) = username {
            settings = settings.set_username(user);
        }
        if let Some(password) = password {
            settings = settings.set_password(password);
        }
        let settings = settings.set_lib_name("authinfo-proxy", env!("CARGO_PKG_VERSION"));
        Ok(Self {
            info: info.set_redis_settings(settings),
            redacted_url: redacted.to_string(),
            ca_pem,
            prefix,
            lease,
            timeout,
        })
    }
}

/// Why a call to Redis failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClusterError {
    #[error("Redis at {url} did not answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("Redis at {url} failed: {reason}")]
    Failed { url: String, reason: String },
    #[error("cannot set up the Redis client for {url}: {reason}")]
    Setup { url: String, reason: String },
}

/// Whether Redis answered the last call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    /// Answering since (Unix seconds; the proxy's start before a first call).
    Up { since: i64 },
    /// Not answering since (Unix seconds), and why.
    Down { since: i64, error: String },
}

/// A connection to the replicas' Redis, shared by everything that uses it.
pub struct Cluster {
    connection: ConnectionManager,
    config: ClusterConfig,
    /// This replica's name in the lease (host, process and a random part: unique per start).
    replica: String,
    state: Mutex<Availability>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("url", &self.config.redacted_url)
            .field("replica", &self.replica)
            .field("state", &*lock(&self.state))
            .finish_non_exhaustive()
    }
}

/// A nonce KEYS[1] used by a request stamped ARGV[2] (Unix seconds), remembered ARGV[1]
/// seconds: 1 when new, 0 when used before, -1 when the request is stamped before KEYS[2], the
/// time this Redis's nonces start from (set when missing: a Redis restarted empty has lost the
/// nonces of requests stamped before it, so those cannot be told from replays).
const NONCE: &str = r"
local t = redis.call('TIME')
local epoch = tonumber(redis.call('GET', KEYS[2]) or '')
if epoch == nil then
  epoch = tonumber(t[1])
  redis.call('SET', KEYS[2], epoch)
end
if tonumber(ARGV[2]) < epoch then return -1 end
if redis.call('SET', KEYS[1], 1, 'NX', 'EX', ARGV[1]) then return 1 end
return 0
";

/// What the shared nonce cache says of a nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceAnswer {
    /// Used for the first time: recorded.
    Fresh,
    /// Used before.
    Replayed,
    /// The request is stamped before this Redis's nonces start (it restarted empty, or was
    /// flushed): a replay could not be told, so it is refused; a request signed now passes.
    BeforeEpoch { epoch: i64 },
}

/// The key of the time this Redis's nonces start from.
const EPOCH: &str = "nonce-epoch";

/// Counts one more under KEYS[1] unless ARGV[1] are counted (the count expires after ARGV[2]
/// seconds); returns the count before.
const BUDGET_TAKE: &str = r"
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n < tonumber(ARGV[1]) then
  redis.call('INCR', KEYS[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return n
";

/// GCRA on Redis's clock (microseconds): one theoretical arrival time per key. Returns 0 when
/// admitted, else the wait in microseconds.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local every = tonumber(ARGV[1])
local tolerance = every * (tonumber(ARGV[2]) - 1)
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local ahead = tat - now
if ahead > tolerance then return ahead - tolerance end
local new = tat + every
redis.call('SET', KEYS[1], string.format('%d', new), 'PX', math.ceil((new - now) / 1000) + 1000)
return 0
";

/// Takes the lease when free, renews it when ours: 1 when we hold it now, else 0.
const LEASE: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
elseif holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// Gives the lease up when ours.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// A terminal seen at ARGV[2] (and issued an authinfo then, when ARGV[3] is 1): its hash
/// KEYS[1] keeps the first time and the latest, never moving back; its id joins the set KEYS[2].
const SEEN: &str = r"
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('HSETNX', KEYS[1], 'first_seen', ARGV[2])
local at = tonumber(ARGV[2])
local fields = {'last_seen'}
if ARGV[3] == '1' then fields[2] = 'last_issued' end
for _, f in ipairs(fields) do
  local old = tonumber(redis.call('HGET', KEYS[1], f) or '')
  if old == nil or at > old then redis.call('HSET', KEYS[1], f, ARGV[2]) end
end
return 1
";

impl Cluster {
    /// A client for `config`. Connects on first use, so a proxy starts while Redis is down;
    /// fails only on a TLS set-up that cannot work.
    pub fn new(config: ClusterConfig) -> Result<Self, ClusterError> {
        let setup = |e: redis::RedisError| ClusterError::Setup {
            url: config.redacted_url.clone(),
            reason: e.to_string(),
        };
        let client = match &config.ca_pem {
            Some(pem) => redis::Client::build_with_tls(
                config.info.clone(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.as_bytes().to_vec()),
                },
            ),
            None => redis::Client::open(config.info.clone()),
        }
        .map_err(setup)?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let connection = ConnectionManager::new_lazy_with_config(client, manager).map_err(setup)?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "replica".into());
        let random = crate::crypto::nonce().unwrap_or_default();
        let replica = format!(
            "{host}-{}-{}",
            std::process::id(),
            random.get(..6).unwrap_or("0")
        );
        Ok(Self {
            connection,
            config,
            replica,
            state: Mutex::new(Availability::Up {
                since: crate::units::unix_now(),
            }),
        })
    }

    /// This replica's name in the lease.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// Whether Redis answered the last call.
    pub fn availability(&self) -> Availability {
        lock(&self.state).clone()
    }

    /// `name` under this merchant's prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.config.prefix)
    }

    /// Runs one call with the timeout, noting (and logging once) when Redis stops or starts
    /// answering.
    async fn call<T, F>(&self, what: &'static str, call: F) -> Result<T, ClusterError>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let result = match tokio::time::timeout(self.config.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(ClusterError::Failed {
                url: self.config.redacted_url.clone(),
                reason: e.to_string(),
            }),
            Err(_) => Err(ClusterError::Timeout {
                url: self.config.redacted_url.clone(),
                timeout: self.config.timeout,
            }),
        };
        let now = crate::units::unix_now();
        let mut state = lock(&self.state);
        match (&*state, &result) {
            (Availability::Up { .. }, Err(error)) => {
                tracing::error!(message_id = crate::events::CLUSTER_UNAVAILABLE, error = %error, call = what,
                    "redis does not answer: terminal requests get a retryable 503 (no nonce can be checked) until it does");
                *state = Availability::Down {
                    since: now,
                    error: error.to_string(),
                };
            }
            (Availability::Down { since, .. }, Ok(_)) => {
                tracing::info!(
                    message_id = crate::events::CLUSTER_RECOVERED,
                    down_seconds = now - since,
                    "redis answers again"
                );
                *state = Availability::Up { since: now };
            }
            (Availability::Down { since, .. }, Err(error)) => {
                *state = Availability::Down {
                    since: *since,
                    error: error.to_string(),
                };
            }
            (Availability::Up { .. }, Ok(_)) => {}
        }
        result
    }

    /// A new handle on the shared connection (cheap: it multiplexes one socket).
    fn conn(&self) -> ConnectionManager {
        self.connection.clone()
    }

    /// `PING`: whether Redis answers now.
    pub async fn ping(&self) -> Result<(), ClusterError> {
        let mut conn = self.conn();
        self.call("ping", async move {
            redis::cmd("PING").query_async::<String>(&mut conn).await
        })
        .await
        .map(drop)
    }

    /// Records the nonce `name` of a request stamped `timestamp`, for `ttl`, unless it was
    /// recorded already. Atomic across replicas (`SET NX EX` in one script with the epoch check).
    pub async fn nonce(
        &self,
        name: &str,
        timestamp: i64,
        ttl: Duration,
    ) -> Result<NonceAnswer, ClusterError> {
        let mut conn = self.conn();
        let (key, epoch) = (self.key(name), self.key(EPOCH));
        let seconds = ttl.as_secs().max(1);
        let answer: i64 = self
            .call("nonce", async move {
                Script::new(NONCE)
                    .key(&key)
                    .key(&epoch)
                    .arg(seconds)
                    .arg(timestamp)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(match answer {
            1 => NonceAnswer::Fresh,
            0 => NonceAnswer::Replayed,
            _ => NonceAnswer::BeforeEpoch {
                epoch: self.nonce_epoch().await?.unwrap_or(0),
            },
        })
    }

    /// Sets the time this Redis's nonces start from to now when it is not set (a replica's
    /// start; whether Redis lost nonces before cannot be known, so requests stamped before now
    /// are not trusted). Returns it.
    pub async fn start_nonce_epoch(&self) -> Result<i64, ClusterError> {
        let mut conn = self.conn();
        let key = self.key(EPOCH);
        self.call("start_nonce_epoch", async move {
            let (seconds, _): (i64, i64) = redis::cmd("TIME").query_async(&mut conn).await?;
            let _: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(seconds)
                .arg("NX")
                .query_async(&mut conn)
                .await?;
            let epoch: Option<i64> = conn.get(&key).await?;
            Ok(epoch.unwrap_or(seconds))
        })
        .await
    }

    /// The time this Redis's nonces start from, when set.
    async fn nonce_epoch(&self) -> Result<Option<i64>, ClusterError> {
        let mut conn = self.conn();
        let key = self.key(EPOCH);
        self.call("nonce_epoch", async move { conn.get(&key).await })
            .await
    }

    /// Counts one more under `name` unless `limit` are counted; returns the count before. The
    /// count expires after `ttl`.
    pub async fn take_count(
        &self,
        name: &str,
        limit: u32,
        ttl: Duration,
    ) -> Result<u32, ClusterError> {
        let mut conn = self.conn();
        let key = self.key(name);
        self.call("take_count", async move {
            Script::new(BUDGET_TAKE)
                .key(&key)
                .arg(limit)
                .arg(ttl.as_secs().max(1))
                .invoke_async(&mut conn)
                .await
        })
        .await
    }

    /// The count under `name`.
    pub async fn count(&self, name: &str) -> Result<u32, ClusterError> {
        let mut conn = self.conn();
        let key = self.key(name);
        self.call("count", async move {
            let n: Option<u32> = conn.get(&key).await?;
            Ok(n.unwrap_or(0))
        })
        .await
    }

    /// One request from the GCRA bucket `name` (a refill every `every`, up to `burst`), on
    /// Redis's clock, so every replica counts against the same time: `Ok(None)` when admitted,
    /// `Ok(Some(wait))` when the next fits after `wait`.
    pub async fn gcra(
        &self,
        name: &str,
        every: Duration,
        burst: u32,
    ) -> Result<Option<Duration>, ClusterError> {
        let mut conn = self.conn();
        let key = self.key(name);
        let every_us = u64::try_from(every.as_micros()).unwrap_or(u64::MAX).max(1);
        self.call("gcra", async move {
            let wait: u64 = Script::new(GCRA)
                .key(&key)
                .arg(every_us)
                .arg(burst.max(1))
                .invoke_async(&mut conn)
                .await?;
            Ok((wait > 0).then(|| Duration::from_micros(wait)))
        })
        .await
    }

    /// Takes the lease `name` when free, or renews it when this replica holds it, for the
    /// configured lease time: whether this replica holds it now.
    pub async fn lease(&self, name: &str) -> Result<bool, ClusterError> {
        let mut conn = self.conn();
        let key = self.key(name);
        let me = self.replica.clone();
        let ms = u64::try_from(self.config.lease.as_millis()).unwrap_or(u64::MAX);
        self.call("lease", async move {
            let held: i64 = Script::new(LEASE)
                .key(&key)
                .arg(me)
                .arg(ms)
                .invoke_async(&mut conn)
                .await?;
            Ok(held == 1)
        })
        .await
    }

    /// Gives the lease `name` up when this replica holds it (at shutdown: another takes over at
    /// once instead of after the lease time).
    pub async fn release(&self, name: &str) -> Result<(), ClusterError> {
        let mut conn = self.conn();
        let key = self.key(name);
        let me = self.replica.clone();
        self.call("release", async move {
            let _: i64 = Script::new(RELEASE)
                .key(&key)
                .arg(me)
                .invoke_async(&mut conn)
                .await?;
            Ok(())
        })
        .await
    }

    /// Who holds the lease `name`, if anyone.
    pub async fn holder(&self, name: &str) -> Result<Option<String>, ClusterError> {
        let mut conn = self.conn();
        let key = self.key(name);
        self.call("holder", async move { conn.get(&key).await })
            .await
    }

    /// The bytes under `name`.
    pub async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, ClusterError> {
        let mut conn = self.conn();
        let key = self.key(name);
        self.call("get", async move { conn.get(&key).await }).await
    }

    /// Sets `name` to `value` (no expiry).
    pub async fn set(&self, name: &str, value: &[u8]) -> Result<(), ClusterError> {
        let mut conn = self.conn();
        let key = self.key(name);
        let value = value.to_vec();
        self.call("set", async move { conn.set(&key, value).await })
            .await
    }

    // === records: one hash per member of a set ===

    /// Notes `member` of the set `set` seen at `at` in its hash `set:member` (`first_seen`
    /// kept, `last_seen`, and `last_issued` when `issued`, never moved back).
    pub async fn seen(
        &self,
        set: &str,
        member: &str,
        at: i64,
        issued: bool,
    ) -> Result<(), ClusterError> {
        let mut conn = self.conn();
        let hash = self.key(&format!("{set}:{member}"));
        let members = self.key(set);
        let member = member.to_owned();
        self.call("seen", async move {
            let _: i64 = Script::new(SEEN)
                .key(&hash)
                .key(&members)
                .arg(member)
                .arg(at)
                .arg(if issued { "1" } else { "0" })
                .invoke_async(&mut conn)
                .await?;
            Ok(())
        })
        .await
    }

    /// Sets `field` of `member`'s hash (and adds `member` to `set`).
    pub async fn set_field(
        &self,
        set: &str,
        member: &str,
        field: &str,
        value: &[u8],
    ) -> Result<(), ClusterError> {
        let mut conn = self.conn();
        let hash = self.key(&format!("{set}:{member}"));
        let members = self.key(set);
        let (member, field, value) = (member.to_owned(), field.to_owned(), value.to_vec());
        self.call("set_field", async move {
            redis::pipe()
                .atomic()
                .sadd(&members, member)
                .ignore()
                .hset(&hash, field, value)
                .ignore()
                .query_async::<()>(&mut conn)
                .await
        })
        .await
    }

    /// Every member of `set` and its hash's fields (members whose hash is gone are left out).
    pub async fn members(&self, set: &str) -> Result<Vec<(String, Fields)>, ClusterError> {
        let mut conn = self.conn();
        let members_key = self.key(set);
        let prefix = self.key(set);
        self.call("members", async move {
            let members: Vec<String> = conn.smembers(&members_key).await?;
            let mut out = Vec::with_capacity(members.len());
            for chunk in members.chunks(1000) {
                let mut pipe = redis::pipe();
                for m in chunk {
                    pipe.hgetall(format!("{prefix}:{m}"));
                }
                let hashes: Vec<Fields> = pipe.query_async(&mut conn).await?;
                out.extend(
                    chunk
                        .iter()
                        .cloned()
                        .zip(hashes)
                        .filter(|(_, h)| !h.is_empty()),
                );
            }
            Ok(out)
        })
        .await
    }

    /// `member`'s hash's fields (empty when it has none).
    pub async fn fields(&self, set: &str, member: &str) -> Result<Fields, ClusterError> {
        let mut conn = self.conn();
        let hash = self.key(&format!("{set}:{member}"));
        self.call("fields", async move { conn.hgetall(&hash).await })
            .await
    }

    /// Removes `members` from `set`, with their hashes.
    pub async fn remove_members(&self, set: &str, members: &[String]) -> Result<(), ClusterError> {
        if members.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn();
        let members_key = self.key(set);
        let hashes: Vec<String> = members
            .iter()
            .map(|m| self.key(&format!("{set}:{m}")))
            .collect();
        let members = members.to_vec();
        self.call("remove_members", async move {
            redis::pipe()
                .atomic()
                .srem(&members_key, members)
                .ignore()
                .del(hashes)
                .ignore()
                .query_async::<()>(&mut conn)
                .await
        })
        .await
    }
}

/// A hash's fields.
pub type Fields = std::collections::HashMap<String, Vec<u8>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str, password: Option<&str>) -> Result<ClusterConfig, String> {
        ClusterConfig::new(
            url,
            None,
            password,
            None,
            "p".into(),
            DEFAULT_LEASE,
            DEFAULT_TIMEOUT,
        )
    }

    #[test]
    fn urls_are_checked_and_their_password_never_shown() {
        let c = config("redis://user:hunter2@10.0.0.5:6380/2", None).expect("valid");
        assert_eq!(c.redacted_url, "redis://user:***@10.0.0.5:6380/2");
        assert!(!format!("{c:?}").contains("hunter2"), "{c:?}");
        assert_eq!(c.info.redis_settings().password(), Some("hunter2"));
        assert_eq!(c.info.redis_settings().db(), 2);
        let c = config("rediss://10.0.0.5:6380", Some("from-file")).expect("valid");
        assert_eq!(c.info.redis_settings().password(), Some("from-file"));
        for (url, why) in [
            ("http://10.0.0.5:6379", "redis:// or rediss://"),
            ("redis://", "no host"),
            ("10.0.0.5:6379", "not a URL"),
        ] {
            let e = config(url, None).expect_err(url);
            assert!(e.contains(why), "{url}: {e}");
        }
        let e = ClusterConfig::new(
            "redis://h:1",
            None,
            None,
            Some("pem".into()),
            "p".into(),
            DEFAULT_LEASE,
            DEFAULT_TIMEOUT,
        )
        .expect_err("a CA without TLS");
        assert!(e.contains("rediss"), "{e}");
    }
}
