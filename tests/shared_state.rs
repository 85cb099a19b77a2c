//! Several instances on one real Redis: exact shared limits and budgets,
//! cooldowns crossing instances, a flushed Redis, a killed instance, and
//! every outage mode with Redis killed, restarted and slowed down.
//!
//! Each test starts its own `redis-server` on a free loopback port, with no
//! persistence, and stops it by PID. Without `redis-server` installed these
//! tests fail (`.ci/run` installs it).

use crate::common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http_body_util::BodyExt;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_gptbalance");

/// A `redis-server` of this test's own.
struct Redis {
    port: u16,
    child: Option<Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Redis {
    fn start() -> Redis {
        let mut r = Redis {
            port: free_port(),
            child: None,
        };
        r.restart();
        r
    }

    /// Starts the server (again) on its port and waits until it answers.
    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--enable-debug-command",
                "local",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run redis-server ({e}): these tests need it installed (apt-get install redis-server; .ci/run does this)"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.try_conn().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not answer on port {}", self.port);
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn try_conn(&self) -> Option<redis::Connection> {
        let c = redis::Client::open(self.url()).ok()?;
        let mut conn = c
            .get_connection_with_timeout(Duration::from_millis(200))
            .ok()?;
        redis::cmd("PING").query::<String>(&mut conn).ok()?;
        Some(conn)
    }

    fn conn(&self) -> redis::Connection {
        self.try_conn().expect("redis answers")
    }

    /// Kills the server (SIGKILL, by PID) and waits for it to be gone.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// This instance's published spend entries of `caller`'s month, summed.
    fn month_tokens(&self, caller: &str) -> u64 {
        let mut c = self.conn();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("gptbalance:caller:{caller}:spend:month:*"))
            .query(&mut c)
            .unwrap();
        let mut sum = 0;
        for k in keys {
            let all: Vec<(String, u64)> = redis::cmd("HGETALL").arg(&k).query(&mut c).unwrap();
            sum += all
                .iter()
                .filter(|(f, _)| f.ends_with(":t"))
                .map(|(_, v)| v)
                .sum::<u64>();
        }
        sum
    }

    /// What `caller`'s shared minute counts of `what` (`r` requests, `t`
    /// tokens): its per-second buckets still in the minute summed, checked
    /// against the running sum the admissions read.
    fn window(&self, caller: &str, what: char) -> u64 {
        let all: HashMap<String, u64> = redis::cmd("HGETALL")
            .arg(format!("gptbalance:caller:{caller}:state"))
            .query(&mut self.conn())
            .unwrap();
        let last = all.get("last").copied().unwrap_or(0);
        let buckets: u64 = (0..60)
            .filter(|i| {
                all.get(&format!("s{i}"))
                    .is_some_and(|&s| s + 60 > last && s <= last)
            })
            .map(|i| all.get(&format!("{what}{i}")).copied().unwrap_or(0))
            .sum();
        let sum = all.get(&what.to_string()).copied().unwrap_or(0);
        assert_eq!(sum, buckets, "{all:?}");
        buckets
    }

    /// Tickets of `caller` still open in Redis.
    fn open_tickets(&self, caller: &str) -> u64 {
        redis::cmd("ZCARD")
            .arg(format!("gptbalance:caller:{caller}:tickets"))
            .query(&mut self.conn())
            .unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

const TOKEN: &str = "tok-app-0123456789";
const LOAD: &str = "tok-load-0123456789";

/// The tests of exactness give Redis a second, so that a busy machine
/// cannot turn them into outage tests; those set [`fast`].
fn shared_yaml(redis: &Redis, instance: &str, on_outage: &str, extra: &str) -> String {
    format!(
        "shared_state:\n  url: \"{}\"\n  timeout: 1s\n  on_outage: {on_outage}\n  replicas: 3\n  instance: {instance}\n{extra}",
        redis.url()
    )
}

fn config(
    up: &MockUpstream,
    redis: &Redis,
    instance: &str,
    on_outage: &str,
    limits: &str,
) -> String {
    format!(
        "usage:\n  dir: ./usage\nserver:\n  admin_token: adm\n{}callers:\n  - name: app\n    token: {TOKEN}\n    limits: {limits}\nopenai_clients:\n{}",
        shared_yaml(redis, instance, on_outage, ""),
        one_client(up, "")
    )
}

/// `yaml` with the 50 ms timeout the outage tests measure against.
fn fast(yaml: String) -> String {
    yaml.replace("timeout: 1s", "timeout: 50ms")
}

async fn start_shared(yaml: &str) -> Gateway {
    let gw = Gateway::start(yaml).await;
    let shared = gw.state.shared.clone().expect("shared_state is set");
    assert!(
        eventually(Duration::from_secs(5), || shared.mode().ok).await,
        "the instance never reached shared mode"
    );
    gw
}

async fn call(url: &str, body: Value) -> Reply2 {
    post_with(url, body, &[("authorization", &format!("Bearer {TOKEN}"))]).await
}

fn body() -> Value {
    json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]})
}

async fn status(gw_url: &str) -> Value {
    get(gw_url, &[("authorization", "Bearer adm")]).await.json()
}

/// 90 requests at once, spread over 3 instances, against a shared limit of
/// 20 requests per minute: exactly 20 are admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_admit_exactly_the_shared_rpm_limit() {
    let redis = Redis::start();
    let up = MockUpstream::start("up").await;
    let mut gws = Vec::new();
    for name in ["a", "b", "c"] {
        gws.push(start_shared(&config(&up, &redis, name, "deny", "{ rpm: 20 }")).await);
    }
    let urls: Vec<String> = gws.iter().map(|g| g.url("/v1/chat/completions")).collect();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut redis.conn())
        .unwrap();
    let started = Instant::now();
    let tasks: Vec<_> = (0..90)
        .map(|i| {
            let url = urls[i % 3].clone();
            tokio::spawn(async move { call(&url, body()).await.status })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let admitted = statuses.iter().filter(|&&s| s == 200).count();
    let limited = statuses.iter().filter(|&&s| s == 429).count();
    println!("shared rpm: {admitted} admitted of 90 against a limit of 20 across 3 instances");
    assert_eq!((admitted, limited), (20, 70), "{statuses:?}");
    // Round trips: at most one script per admission and one per settle
    // (concurrent ones share a call), plus each instance's heartbeat once
    // a second.
    let calls = |cmd: &str| -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut redis.conn())
            .unwrap();
        info.lines()
            .find(|l| l.starts_with(&format!("cmdstat_{cmd}:")))
            .and_then(|l| l.split("calls=").nth(1))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    assert!(eventually(Duration::from_secs(5), || redis.open_tickets("app") == 0).await);
    let scripts = calls("evalsha") + calls("eval");
    let beats = 3 * (started.elapsed().as_secs() + 2);
    println!(
        "Redis scripts: {scripts} for 90 admissions and 20 settles ({:.2} per request)",
        scripts as f64 / 90.0
    );
    assert!(scripts <= 110 + beats, "{scripts} scripts");
    assert_eq!(up.count(), 20);
    // Every instance answered some of each: the limit is shared, not split.
    let r = call(&urls[1], body()).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
}

/// Concurrency is held across instances until a response ends; budgets
/// count every instance's spend, and a FLUSHALL neither loses nor doubles
/// what was spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_and_budgets_hold_across_instances_and_a_flushall() {
    let redis = Redis::start();
    let up = MockUpstream::start("up").await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let a = start_shared(&config(&up, &redis, "a", "deny", "{ concurrency: 2 }")).await;
    let b = start_shared(&config(&up, &redis, "b", "deny", "{ concurrency: 2 }")).await;
    up.set_default(Reply::Sse {
        events: vec![
            chat_chunk("x"),
            usage_chunk(3, 2),
            "data: [DONE]\n\n".into(),
        ],
        gate: Some(gate.clone()),
        abort_at_end: false,
    });
    let stream_body = json!({"model": "m", "stream": true, "max_tokens": 1, "messages": []});
    let open = |url: String| {
        let body = stream_body.clone();
        async move {
            let auth = format!("Bearer {TOKEN}");
            send(post_req(
                &url,
                body.to_string(),
                &[("authorization", &auth)],
            ))
            .await
        }
    };
    // Two streams held on `a`; `b` refuses a third.
    let s1 = tokio::spawn(open(a.url("/v1/chat/completions")));
    let s2 = tokio::spawn(open(a.url("/v1/chat/completions")));
    assert!(
        eventually(Duration::from_secs(5), || up.count() == 2).await,
        "both streams reached the upstream"
    );
    let r = call(&b.url("/v1/chat/completions"), body()).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.text().contains("limits.concurrency"), "{}", r.text());
    // Held past a few heartbeats, the reservations' amounts are kept
    // alive together with their tickets.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let pttl = |what: &str| -> i64 {
        redis::cmd("PTTL")
            .arg(format!("gptbalance:caller:app:{what}"))
            .query(&mut redis.conn())
            .unwrap()
    };
    let (tickets, counters) = (pttl("tickets"), pttl("state"));
    assert!(
        tickets > 0 && (tickets - counters).abs() < 500,
        "tickets {tickets} ms, counters {counters} ms"
    );
    gate.add_permits(100);
    assert_eq!(s1.await.unwrap().status, 200);
    assert_eq!(s2.await.unwrap().status, 200);
    assert!(eventually(Duration::from_secs(5), || redis.open_tickets("app") == 0).await);
    let r = call(&b.url("/v1/chat/completions"), body()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    a.stop().await;
    b.stop().await;

    // A token budget of 100: every answer costs 18, every admission
    // reserves about 28, so five fit in all, whichever instance serves them.
    redis.conn();
    let _: () = redis::cmd("FLUSHALL").query(&mut redis.conn()).unwrap();
    up.set_default(Reply::Ok);
    let limits = "{ budget_tokens: { amount: 100, per: month } }";
    let a = start_shared(&config(&up, &redis, "a", "deny", limits)).await;
    let b = start_shared(&config(&up, &redis, "b", "deny", limits)).await;
    let urls = [a.url("/v1/chat/completions"), b.url("/v1/chat/completions")];
    let mut admitted = 0;
    for i in 0..3 {
        let r = call(&urls[i % 2], body()).await;
        assert_eq!(r.status, 200, "{}", r.text());
        admitted += 1;
        assert!(eventually(Duration::from_secs(5), || redis.open_tickets("app") == 0).await);
    }
    assert!(eventually(Duration::from_secs(5), || redis.month_tokens("app") == 54).await);
    // Flushed mid-run: each instance writes its own spend back, and the
    // total is what was spent, not more and not less.
    let _: () = redis::cmd("FLUSHALL").query(&mut redis.conn()).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || redis.month_tokens("app") == 54).await,
        "after FLUSHALL the spend came back as {}",
        redis.month_tokens("app")
    );
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        redis.month_tokens("app"),
        54,
        "republished, never added twice"
    );
    for i in 3..8 {
        let r = call(&urls[i % 2], body()).await;
        if r.status == 200 {
            admitted += 1;
            assert!(eventually(Duration::from_secs(5), || redis.open_tickets("app") == 0).await);
        } else {
            assert_eq!(r.status, 429, "{}", r.text());
            assert_eq!(r.json()["error"]["code"], "insufficient_quota");
        }
    }
    println!("shared budget: {admitted} admitted, 5 fit the budget");
    assert_eq!(admitted, 5, "a budget of 100 holds five answers of 18");
    assert_eq!(redis.month_tokens("app"), 90);
}

/// A 429 seen by one instance cools the key on the others within 100 ms,
/// and on an instance that starts later; a shorter one never shortens it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cooldown_crosses_instances() {
    let redis = Redis::start();
    let up = MockUpstream::start("up").await;
    let yaml = |inst: &str| {
        format!(
            "usage:\n  enabled: false\n{}openai_clients:\n{}",
            shared_yaml(&redis, inst, "allow", ""),
            client_yaml(
                "c",
                &up.url(),
                &["k1", "k2"],
                "model_match: { type: exact, value: [m] }"
            )
        )
    };
    let a = start_shared(&yaml("a")).await;
    let b = start_shared(&yaml("b")).await;
    // Subscribed: a cooldown published now reaches `b`.
    tokio::time::sleep(Duration::from_millis(300)).await;
    up.push(Reply::Raw(
        429,
        vec![("retry-after".into(), "120".into())],
        "{}".into(),
    ));
    let r = a.chat("m").await;
    assert_eq!(r.status, 200, "the other key answered");
    let seen = Instant::now();
    let cooled = |g: &Gateway| {
        g.state.table.load().clients[0]
            .keys
            .iter()
            .filter(|k| !k.health.is_available())
            .count()
    };
    assert_eq!(cooled(&a), 1);
    assert!(
        eventually(Duration::from_millis(100), || cooled(&b) == 1).await,
        "`b` did not honour `a`'s cooldown within 100 ms"
    );
    println!("cooldown crossed instances in {:?}", seen.elapsed());
    let long = b.state.table.load().clients[0]
        .keys
        .iter()
        .find_map(|k| k.health.cooling_for())
        .unwrap();
    assert!(long > Duration::from_secs(100), "{long:?}");
    // `b` now sees a short 429 on the other key's twin... and the same key:
    // a shorter cooldown published for it does not shorten the shared one.
    let mut c = redis.conn();
    let before: std::collections::HashMap<String, u64> = redis::cmd("HGETALL")
        .arg("gptbalance:cooldowns")
        .query(&mut c)
        .unwrap();
    assert_eq!(before.len(), 1, "{before:?}");
    // A later instance reads the running cooldown at start.
    let late = start_shared(&yaml("late")).await;
    assert!(eventually(Duration::from_secs(2), || cooled(&late) == 1).await);
    let key_field = before.keys().next().unwrap().clone();
    let key_id = key_field.split('\t').nth(1).unwrap().to_owned();
    let shared = b.state.shared.clone().unwrap();
    shared.publish_cooldown(
        "c",
        &key_id,
        std::time::SystemTime::now() + Duration::from_secs(1),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after: std::collections::HashMap<String, u64> = redis::cmd("HGETALL")
        .arg("gptbalance:cooldowns")
        .query(&mut c)
        .unwrap();
    assert_eq!(
        before, after,
        "a shorter cooldown never shortens the shared one"
    );
    assert_eq!(cooled(&a), 1);
}

/// A `gptbalance serve` process to kill.
struct Daemon {
    child: Child,
    addr: String,
}

impl Daemon {
    fn start(config: &Path) -> Daemon {
        Self::start_with(config, &[])
    }

    fn start_with(config: &Path, env: &[(&str, &str)]) -> Daemon {
        let mut child = Command::new(BIN)
            .envs(env.iter().copied())
            .args([
                "serve",
                "--config",
                config.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ])
            .current_dir(config.parent().unwrap())
            .env_remove("NOTIFY_SOCKET")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let l2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listen=").nth(1) {
                    let _ = tx.send(rest.split(['"', ' ']).next().unwrap().to_owned());
                }
                l2.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no listen address: {:?}", log.lock().unwrap()));
        Daemon { child, addr }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An instance killed with SIGKILL while it holds both concurrency slots:
/// the slots free themselves at their deadline, and the other instance
/// admits again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_instance_frees_its_reservations() {
    let redis = Redis::start();
    let up = MockUpstream::start("up").await;
    up.set_default(Reply::Hang);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(
        &path,
        config(&up, &redis, "doomed", "deny", "{ concurrency: 2 }"),
    )
    .unwrap();
    let doomed = Daemon::start(&path);
    let url = format!("http://{}/v1/chat/completions", doomed.addr);
    // Shared mode reached (it starts in outage mode until Redis answers).
    let st = format!("http://{}/admin/status", doomed.addr);
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&st).await["shared_state"]["mode"] != "ok" {
        assert!(
            Instant::now() < deadline,
            "the daemon never reached shared mode"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..2 {
        let req = post_req(
            &url,
            body().to_string(),
            &[("authorization", &format!("Bearer {TOKEN}"))],
        );
        // Cut when the daemon dies (an error, not a panic): never awaited.
        tokio::spawn(client().request(req));
    }
    assert!(eventually(Duration::from_secs(5), || up.count() == 2).await);
    assert_eq!(redis.open_tickets("app"), 2, "two slots held in Redis");
    let other = start_shared(&config(&up, &redis, "other", "deny", "{ concurrency: 2 }")).await;
    up.set_default(Reply::Ok);
    let r = call(&other.url("/v1/chat/completions"), body()).await;
    assert_eq!(r.status, 429, "the killed-to-be instance holds both slots");
    let killed_at = Instant::now();
    drop(doomed); // SIGKILL
    let url = other.url("/v1/chat/completions");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = call(&url, body()).await;
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 429, "{}", r.text());
        assert!(
            Instant::now() < deadline,
            "the dead instance's slots never freed themselves"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "slots of a killed instance freed after {:?}",
        killed_at.elapsed()
    );
}

/// Redis killed under load and restarted, in each `on_outage` mode: no
/// request waits longer than the timeout for it, the mode shows in
/// `/admin/status` and `/metrics`, and the instance returns to shared
/// mode by itself with what it admitted meanwhile counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_and_restarted_in_each_outage_mode() {
    let mut redis = Redis::start();
    let up = MockUpstream::start("up").await;
    let mut worst = Duration::ZERO;
    for mode in ["deny", "allow", "local_share"] {
        let yaml = fast(config(&up, &redis, mode, mode, "{ rpm: 9 }")).replace(
            "openai_clients:",
            &format!("  - name: load\n    token: {LOAD}\n    limits: {{ rpm: 1000000, concurrency: 1000 }}\nopenai_clients:"),
        );
        let gw = start_shared(&yaml).await;
        let url = gw.url("/v1/chat/completions");
        let st = gw.url("/admin/status");
        assert_eq!(status(&st).await["shared_state"]["mode"], "ok");
        let r = call(&url, body()).await;
        assert_eq!(r.status, 200, "{mode}: {}", r.text());
        // Load from another caller all through the outage and the return.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let load: Vec<_> = (0..4)
            .map(|_| {
                let (url, stop) = (url.clone(), stop.clone());
                tokio::spawn(async move {
                    let (mut worst, mut n) = (Duration::ZERO, 0);
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let t = Instant::now();
                        let r = post_with(
                            &url,
                            body(),
                            &[("authorization", &format!("Bearer {LOAD}"))],
                        )
                        .await;
                        worst = worst.max(t.elapsed());
                        assert!([200, 503].contains(&r.status), "{}", r.text());
                        n += 1;
                    }
                    (worst, n)
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        redis.kill();
        let mut statuses = Vec::new();
        for _ in 0..12 {
            let t = Instant::now();
            let r = call(&url, body()).await;
            worst = worst.max(t.elapsed());
            statuses.push(r.status);
            if r.status == 503 {
                assert_eq!(r.json()["error"]["code"], "shared_state_unavailable");
            }
        }
        let s = status(&st).await;
        assert_eq!(s["shared_state"]["mode"], "outage", "{mode}: {s}");
        let metrics = get(
            &gw.url("/metrics"),
            &[("authorization", &format!("Bearer {TOKEN}"))],
        )
        .await
        .text();
        assert!(
            metrics.contains("gptbalance_shared_state_up 0"),
            "{metrics}"
        );
        let ok = statuses.iter().filter(|&&s| s == 200).count();
        match mode {
            "deny" => assert!(statuses.iter().all(|&s| s == 503), "{statuses:?}"),
            "allow" => assert_eq!(ok, 12, "{statuses:?}"),
            // rpm 9 over 3 replicas: 3 in process.
            _ => assert_eq!(ok, 3, "{statuses:?}"),
        }
        redis.restart();
        let shared = gw.state.shared.clone().unwrap();
        assert!(
            eventually(Duration::from_secs(6), || shared.mode().ok).await,
            "{mode}: not back in shared mode within 5 s of Redis answering"
        );
        assert_eq!(status(&st).await["shared_state"]["mode"], "ok");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in load {
            let (w, n) = t.await.unwrap();
            assert!(n > 0);
            worst = worst.max(w);
        }
        if mode != "deny" {
            // Those admitted in process now count in the shared window.
            assert_eq!(redis.window("app", 'r'), ok as u64);
        }
        gw.stop().await;
        let _: () = redis::cmd("FLUSHALL").query(&mut redis.conn()).unwrap();
    }
    println!("longest request during a Redis outage: {worst:?} (timeout 50 ms)");
    assert!(worst < Duration::from_secs(1), "{worst:?}");
}

/// A Redis that stops answering for a second (`DEBUG SLEEP 1`) holds no
/// request past the timeout: each is served in outage mode meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_redis_never_stalls_requests() {
    let redis = Redis::start();
    let up = MockUpstream::start("up").await;
    let gw = start_shared(&fast(config(&up, &redis, "slow", "allow", "{ rpm: 1000 }"))).await;
    let url = gw.url("/v1/chat/completions");
    assert_eq!(call(&url, body()).await.status, 200);
    let port = redis.port;
    let sleeper = std::thread::spawn(move || {
        let c = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).unwrap();
        let mut conn = c.get_connection().unwrap();
        let _: () = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg(1)
            .query(&mut conn)
            .unwrap();
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let t = Instant::now();
        let r = call(&url, body()).await;
        worst = worst.max(t.elapsed());
        assert_eq!(r.status, 200, "{}", r.text());
    }
    sleeper.join().unwrap();
    println!("longest request while Redis slept: {worst:?}");
    assert!(worst < Duration::from_millis(700), "{worst:?}");
    let shared = gw.state.shared.clone().unwrap();
    assert!(eventually(Duration::from_secs(6), || shared.mode().ok).await);
}

/// A TCP relay to Redis that can hold back everything Redis answers, on
/// every connection, until told to let it through: one late answer.
struct Relay {
    port: u16,
    hold: Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    async fn start(redis_port: u16) -> Relay {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hold = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let held = hold.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await
                else {
                    continue;
                };
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_client, &mut to_server).await;
                });
                let held = held.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match from_server.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        while held.load(std::sync::atomic::Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        if to_client.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Relay { port, hold }
    }

    fn hold(&self, on: bool) {
        self.hold.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

/// One answer later than `timeout` (Redis itself fine, its answer held
/// back on the way) under `on_outage: deny`: the request waiting on it is
/// answered 503 `shared_state_unavailable` at `timeout`, but the instance
/// stays in shared mode (its ping is answered) and the next request is
/// admitted. Answers that stop coming for good still make an outage,
/// after the ping, and the instance comes back when they flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_late_answer_fails_its_request_not_the_instance() {
    let redis = Redis::start();
    let relay = Relay::start(redis.port).await;
    let up = MockUpstream::start("up").await;
    // A small limit: every request takes the exact path (no lease).
    let yaml = config(&up, &redis, "late", "deny", "{ rpm: 20 }")
        .replace(&redis.url(), &format!("redis://127.0.0.1:{}/0", relay.port))
        .replace("timeout: 1s", "timeout: 300ms");
    let gw = start_shared(&yaml).await;
    let url = gw.url("/v1/chat/completions");
    let st = gw.url("/admin/status");
    assert_eq!(call(&url, body()).await.status, 200);
    let since = status(&st).await["shared_state"]["since"].clone();
    relay.hold(true);
    let r = call(&url, body()).await;
    relay.hold(false);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "shared_state_unavailable");
    let s = status(&st).await;
    assert_eq!(s["shared_state"]["mode"], "ok", "{s}");
    // Past the supervisor's ping and a heartbeat: still the same mode,
    // never switched.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = status(&st).await;
    assert_eq!(s["shared_state"]["mode"], "ok", "{s}");
    assert_eq!(s["shared_state"]["since"], since, "{s}");
    let r = call(&url, body()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // No answers at all: an outage once the ping goes unanswered, with
    // no request waiting much past the timeout meanwhile.
    relay.hold(true);
    let shared = gw.state.shared.clone().unwrap();
    let mut worst = Duration::ZERO;
    for _ in 0..6 {
        let t = Instant::now();
        let r = call(&url, body()).await;
        worst = worst.max(t.elapsed());
        assert_eq!(r.status, 503, "{}", r.text());
    }
    assert!(
        eventually(Duration::from_secs(3), || !shared.mode().ok).await,
        "no outage while Redis's answers were held"
    );
    relay.hold(false);
    assert!(
        eventually(Duration::from_secs(6), || shared.mode().ok).await,
        "not back in shared mode"
    );
    assert_eq!(call(&url, body()).await.status, 200);
    println!("longest request while answers were held: {worst:?} (timeout 300 ms)");
    assert!(worst < Duration::from_secs(2), "{worst:?}");
}

/// `validate-config` checks the URL's form with line:col; `check-keys`
/// pings Redis and never prints the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_config_and_check_keys_know_shared_state() {
    let redis = Redis::start();
    let up = MockUpstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, url: &str| {
        let p = dir.path().join(name);
        std::fs::write(
            &p,
            format!(
                "usage:\n  enabled: false\nshared_state:\n  url: \"{url}\"\n  replicas: 2\nopenai_clients:\n{}",
                one_client(&up, "")
            ),
        )
        .unwrap();
        p
    };
    let run = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (url, says) in [
        ("http://127.0.0.1:6379", "must start with redis://"),
        ("redis://:6379/0", "has no host"),
        ("redis://h:99999", "port"),
        ("redis://h:6379/x", "database"),
    ] {
        let p = write("bad.yaml", url);
        let (code, out, err) = run(&["validate-config", "--config", p.to_str().unwrap()]);
        assert_ne!(code, Some(0), "{url}");
        let all = format!("{out}{err}");
        assert!(all.contains(":4:"), "{url}: no line:col in {all}");
        assert!(all.contains(says), "{url}: {all}");
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for example in ["examples/cluster/a.yaml", "examples/cluster/b.yaml"] {
        let p = root.join(example);
        let (code, out, err) = run(&["validate-config", "--config", p.to_str().unwrap()]);
        assert_eq!(code, Some(0), "{example}: {out}{err}");
    }
    let good = write(
        "good.yaml",
        &format!("redis://:s3cret-pw@127.0.0.1:{}/0", redis.port),
    );
    let (code, out, err) = run(&["validate-config", "--config", good.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}{err}");
    // A password Redis does not need is refused: the connection fails and
    // check-keys says unreachable. Without it: ok.
    let open = write("open.yaml", &redis.url());
    let (code, out, err) = run(&["check-keys", "--config", open.to_str().unwrap()]);
    let line = format!("shared_state 127.0.0.1:{} ok", redis.port);
    assert!(out.contains(&line), "{out}{err}");
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = run(&["check-keys", "--config", good.to_str().unwrap()]);
    assert!(!format!("{out}{err}").contains("s3cret-pw"), "{out}{err}");
    let down = write("down.yaml", &format!("redis://127.0.0.1:{}/0", free_port()));
    let (code2, out2, err2) = run(&["check-keys", "--config", down.to_str().unwrap()]);
    assert!(out2.contains("unreachable"), "{out2}{err2}");
    assert_eq!(code2, Some(1), "an unreachable Redis fails check-keys");
    let _ = (code, out, err);
}

/// An instance starts while Redis is down, in outage mode, and turns to
/// shared mode by itself once Redis answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_starts_with_redis_down_and_joins_when_it_answers() {
    let mut redis = Redis::start();
    redis.kill();
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&fast(config(&up, &redis, "early", "deny", "{ rpm: 5 }"))).await;
    let url = gw.url("/v1/chat/completions");
    let t = Instant::now();
    let r = call(&url, body()).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "shared_state_unavailable");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    let s = status(&gw.url("/admin/status")).await;
    assert_eq!(s["shared_state"]["mode"], "outage", "{s}");
    redis.restart();
    let shared = gw.state.shared.clone().unwrap();
    assert!(
        eventually(Duration::from_secs(6), || shared.mode().ok).await,
        "not in shared mode within 5 s of Redis answering"
    );
    let r = call(&url, body()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers["x-ratelimit-remaining-requests"], "4");
}

/// Tokens per minute across two instances: each admission reserves its
/// estimate in the shared window and its settle turns it into what was
/// used (18 a request), so `tpm: 100` admits five in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_is_reserved_and_settled_in_the_shared_window() {
    let redis = Redis::start();
    let up = MockUpstream::start("up").await;
    let reserve = (body().to_string().len() as u64).div_ceil(3) + 1;
    assert!((19..=28).contains(&reserve), "{reserve}");
    let a = start_shared(&config(&up, &redis, "a", "deny", "{ tpm: 100 }")).await;
    let b = start_shared(&config(&up, &redis, "b", "deny", "{ tpm: 100 }")).await;
    let urls = [a.url("/v1/chat/completions"), b.url("/v1/chat/completions")];
    let mut statuses = Vec::new();
    for i in 0..7 {
        let r = call(&urls[i % 2], body()).await;
        statuses.push(r.status);
        assert!(eventually(Duration::from_secs(5), || redis.open_tickets("app") == 0).await);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429]);
    assert_eq!(redis.window("app", 't'), 90);
}

/// `rediss://`: TLS to a Redis whose certificate a CA of the test's own
/// signs, trusted through `SSL_CERT_FILE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_connects_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(d)
            .output()
            .expect("openssl is installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "srv.key",
        "-out",
        "srv.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        d.join("ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "srv.pem",
        "-days",
        "2",
        "-extfile",
        "ext",
    ]);
    let port = free_port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--tls-cert-file",
            "srv.pem",
            "--tls-key-file",
            "srv.key",
            "--tls-ca-cert-file",
            "ca.pem",
        ])
        .args([
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is installed");
    let _redis = Redis {
        port,
        child: Some(child),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "redis-server (TLS) did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let up = MockUpstream::start("up").await;
    let path = d.join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "usage:\n  dir: ./usage\nserver:\n  admin_token: adm\nshared_state:\n  url: \"rediss://localhost:{port}/0\"\n  timeout: 1s\n  on_outage: deny\n  replicas: 1\n  instance: tls\ncallers:\n  - name: app\n    token: {TOKEN}\n    limits: {{ rpm: 1 }}\nopenai_clients:\n{}",
            one_client(&up, "")
        ),
    )
    .unwrap();
    let ca = d.join("ca.pem");
    let check = |trust: bool| {
        let mut cmd = Command::new(BIN);
        cmd.args(["check-keys", "--config", path.to_str().unwrap()]);
        if trust {
            cmd.env("SSL_CERT_FILE", &ca);
        } else {
            cmd.env("SSL_CERT_FILE", d.join("srv.csr"));
        }
        String::from_utf8_lossy(&cmd.output().unwrap().stdout).into_owned()
    };
    assert!(
        check(true).contains(&format!("shared_state localhost:{port} ok")),
        "{}",
        check(true)
    );
    assert!(
        check(false).contains("unreachable"),
        "an untrusted certificate is refused"
    );
    let daemon = Daemon::start_with(&path, &[("SSL_CERT_FILE", ca.to_str().unwrap())]);
    let st = format!("http://{}/admin/status", daemon.addr);
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&st).await["shared_state"]["mode"] != "ok" {
        assert!(Instant::now() < deadline, "never in shared mode over TLS");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("http://{}/v1/chat/completions", daemon.addr);
    assert_eq!(call(&url, body()).await.status, 200);
    assert_eq!(
        call(&url, body()).await.status,
        429,
        "rpm 1, counted in Redis over TLS"
    );
}

impl Redis {
    /// `caller`'s tickets in Redis that are leases.
    fn leases(&self, caller: &str) -> Vec<String> {
        let all: Vec<String> = redis::cmd("ZRANGE")
            .arg(format!("gptbalance:caller:{caller}:tickets"))
            .arg(0)
            .arg(-1)
            .query(&mut self.conn())
            .unwrap();
        all.into_iter().filter(|m| m.contains(":lease:")).collect()
    }

    /// `caller`'s leases whose deadline has not passed (by Redis's clock):
    /// those past it free themselves at the caller's next admission.
    fn live_leases(&self, caller: &str) -> Vec<String> {
        let mut c = self.conn();
        let (secs, micros): (u64, u64) = redis::cmd("TIME").query(&mut c).unwrap();
        let now_ms = secs * 1000 + micros / 1000;
        let live: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(format!("gptbalance:caller:{caller}:tickets"))
            .arg(format!("({now_ms}"))
            .arg("+inf")
            .query(&mut c)
            .unwrap();
        live.into_iter().filter(|m| m.contains(":lease:")).collect()
    }
}

/// Keeps `tasks` requests at once going to each of `urls` until `stop`;
/// returns the statuses seen (until a request fails: its gateway was
/// killed).
fn load(
    urls: &[String],
    tasks: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<u16>>> {
    urls.iter()
        .flat_map(|u| std::iter::repeat_n(u.clone(), tasks))
        .map(|url| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let req = post_req(
                        &url,
                        body().to_string(),
                        &[("authorization", &format!("Bearer {TOKEN}"))],
                    );
                    // An error ends the load: the daemon was killed.
                    let Ok(resp) = client().request(req).await else {
                        break;
                    };
                    seen.push(resp.status().as_u16());
                    let _ = resp.into_body().collect().await;
                }
                seen
            })
        })
        .collect()
}

/// How long a quiet caller's lease may take to be given back: kept warm
/// for `lease::WARM` (20 s) after its caller's last request, then given
/// back at the next relet.
const GIVEN_BACK: Duration = Duration::from_secs(35);

/// A new caller's second request takes a lease and is admitted from it
/// (the first goes the exact path); once the caller went quiet and its
/// lease was given back (after it was kept warm), its very next request
/// takes a lease again. Each
/// lease is held in Redis as soon as the request that asked for it is
/// answered, and Redis counts exactly the requests admitted in the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_caller_leases_with_its_own_admission() {
    let redis = Redis::start();
    let up = MockUpstream::start("up").await;
    let limits = "{ rpm: 1000000, concurrency: 1000 }";
    let gw = start_shared(&config(&up, &redis, "soon", "deny", limits)).await;
    let url = gw.url("/v1/chat/completions");
    assert_eq!(call(&url, body()).await.status, 200);
    assert!(redis.leases("app").is_empty(), "{:?}", redis.leases("app"));
    assert_eq!(redis.window("app", 'r'), 1);
    assert_eq!(call(&url, body()).await.status, 200);
    let held = redis.leases("app");
    assert!(
        held.iter().any(|m| m.starts_with("soon:lease:")),
        "the second request took no lease: {held:?}"
    );
    // Quiet: the lease is kept warm for a while, then given back (what it
    // did not admit leaves the window); then the caller comes back with a
    // single request.
    assert!(
        eventually(GIVEN_BACK, || redis.leases("app").is_empty()).await,
        "the quiet caller's lease was not given back: {:?}",
        redis.leases("app")
    );
    assert_eq!(redis.window("app", 'r'), 2);
    assert_eq!(call(&url, body()).await.status, 200);
    let held = redis.leases("app");
    assert!(
        held.iter().any(|m| m.starts_with("soon:lease:")),
        "the returning caller's first request took no lease: {held:?}"
    );
    assert!(
        eventually(GIVEN_BACK, || redis.leases("app").is_empty()).await,
        "{:?}",
        redis.leases("app")
    );
    assert_eq!(redis.window("app", 'r'), 3);
    assert_eq!(up.count(), 3);
}

/// A limit with plenty of room: three busy instances take leases of it and
/// admit from them, never more than the limit together; once the load
/// stops the leases are given back and Redis counts exactly what was
/// admitted; and the limit, reached afterwards request by request, is
/// exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_stay_within_the_limit_and_come_back() {
    let redis = Redis::start();
    let up = MockUpstream::start("up").await;
    let limit: u64 = 1200;
    let limits = format!("{{ rpm: {limit}, concurrency: 100 }}");
    let mut gws = Vec::new();
    for name in ["a", "b", "c"] {
        gws.push(start_shared(&config(&up, &redis, name, "deny", &limits)).await);
    }
    let urls: Vec<String> = gws.iter().map(|g| g.url("/v1/chat/completions")).collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks = load(&urls, 4, stop.clone());
    // Load until some lease has been seen and a good part of the limit is
    // used (or, on a slow machine, for at most 20 s).
    let started = Instant::now();
    let mut leased = 0;
    while started.elapsed() < Duration::from_secs(20) {
        leased = leased.max(redis.leases("app").len());
        if leased > 0 && up.count() as u64 >= limit / 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.extend(t.await.unwrap());
    }
    assert!(leased > 0, "no instance took a lease");
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 429),
        "{statuses:?}"
    );
    let admitted = statuses.iter().filter(|&&s| s == 200).count() as u64;
    assert!(admitted <= limit, "{admitted} admitted against {limit}");
    // Given back once the callers went quiet (and the leases were kept
    // warm): Redis holds no lease, and its minute counts exactly the
    // requests admitted.
    assert!(
        eventually(GIVEN_BACK, || redis.leases("app").is_empty()).await,
        "leases still held: {:?}",
        redis.leases("app")
    );
    assert_eq!(redis.window("app", 'r'), admitted);
    // The rest of the limit, one request at a time, across the instances.
    let mut more = 0;
    let mut refused_in_a_row = 0;
    for i in 0.. {
        let r = call(&urls[i % 3], body()).await;
        if r.status == 200 {
            more += 1;
            refused_in_a_row = 0;
        } else {
            assert_eq!(r.status, 429, "{}", r.text());
            refused_in_a_row += 1;
            if refused_in_a_row == 3 {
                break;
            }
        }
    }
    println!(
        "leases: {admitted} admitted under load ({} requests, leases seen: {leased}), then {more}: {} against rpm {limit}",
        statuses.len(),
        admitted + more
    );
    assert_eq!(admitted + more, limit);
    assert_eq!(up.count(), limit as usize);
}

/// An instance killed with SIGKILL while it holds a lease: the lease's
/// slots free themselves at its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_instance_gives_its_lease_back_by_its_deadline() {
    let redis = Redis::start();
    let up = MockUpstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    let limits = "{ rpm: 1000000, concurrency: 1000 }";
    std::fs::write(&path, config(&up, &redis, "doomed", "deny", limits)).unwrap();
    let doomed = Daemon::start(&path);
    let st = format!("http://{}/admin/status", doomed.addr);
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&st).await["shared_state"]["mode"] != "ok" {
        assert!(
            Instant::now() < deadline,
            "the daemon never reached shared mode"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks = load(
        &[format!("http://{}/v1/chat/completions", doomed.addr)],
        4,
        stop.clone(),
    );
    assert!(
        eventually(Duration::from_secs(20), || redis
            .leases("app")
            .iter()
            .any(|m| m.starts_with("doomed:lease:")))
        .await,
        "the busy instance took no lease"
    );
    drop(doomed); // SIGKILL, lease held
    let killed_at = Instant::now();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let slots = |redis: &Redis| -> u64 {
        redis::cmd("HGET")
            .arg("gptbalance:caller:app:state")
            .arg("n")
            .query::<Option<u64>>(&mut redis.conn())
            .unwrap()
            .unwrap_or(0)
    };
    assert!(slots(&redis) > 0, "the lease holds slots");
    let other = start_shared(&config(&up, &redis, "other", "deny", limits)).await;
    let url = other.url("/v1/chat/completions");
    let deadline = Instant::now() + Duration::from_secs(30);
    // Each admission frees what is past its deadline.
    loop {
        assert_eq!(call(&url, body()).await.status, 200);
        if redis.leases("app").is_empty() && slots(&redis) == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dead instance's lease never freed itself"
        );
        // Over a second apart: too few for `other` to lease itself.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    println!(
        "lease of a killed instance freed after {:?}",
        killed_at.elapsed()
    );
    assert!(
        killed_at.elapsed() >= Duration::from_secs(5),
        "freed before its deadline"
    );
}

/// Redis asleep (`DEBUG SLEEP`, longer than any lease's life) while three
/// busy instances hold leases of a shared limit: the relets that fall in
/// the sleep are dropped at `timeout`, no request waits for Redis to wake
/// (each sent in the sleep's first half is answered, admitted from what a
/// lease still holds or denied, before the sleep ends), and the instances
/// together never admit more than the limit, reached under the same load.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_relet_stalls_no_request_and_overshoots_nothing() {
    let redis = Redis::start();
    let up = MockUpstream::start("up").await;
    let limit: u64 = 2000;
    let limits = format!("{{ rpm: {limit}, concurrency: 100 }}");
    let mut gws = Vec::new();
    for name in ["a", "b", "c"] {
        gws.push(start_shared(&fast(config(&up, &redis, name, "deny", &limits))).await);
    }
    let urls: Vec<String> = gws.iter().map(|g| g.url("/v1/chat/completions")).collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = urls
        .iter()
        .flat_map(|u| std::iter::repeat_n(u.clone(), 4))
        .map(|url| {
            let (stop, refused) = (stop.clone(), refused.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let t = Instant::now();
                    let status = call(&url, body()).await.status;
                    seen.push((status, t.elapsed(), t));
                    if status == 429 {
                        refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                seen
            })
        })
        .collect();
    // Every instance holds a lease before Redis sleeps.
    let all_leased = || {
        let held = redis.leases("app");
        ["a", "b", "c"]
            .iter()
            .all(|i| held.iter().any(|m| m.starts_with(&format!("{i}:lease:"))))
    };
    assert!(
        eventually(Duration::from_secs(20), all_leased).await,
        "not every instance took a lease: {:?}",
        redis.leases("app")
    );
    let sleep = Duration::from_secs(3);
    let port = redis.port;
    let slept_at = Instant::now();
    // Off the runtime's threads, which the gateways and the load use.
    tokio::task::spawn_blocking(move || {
        let c = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).unwrap();
        let mut conn = c.get_connection().unwrap();
        let _: () = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg(sleep.as_secs())
            .query(&mut conn)
            .unwrap();
    })
    .await
    .unwrap();
    let woke = slept_at.elapsed();
    // The same load until the limit refuses requests (or 30 s).
    eventually(Duration::from_secs(30), || {
        refused.load(std::sync::atomic::Ordering::Relaxed) > 0
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut seen = Vec::new();
    for t in tasks {
        seen.extend(t.await.unwrap());
    }
    let (worst, worst_at) = seen
        .iter()
        .map(|(_, d, t)| (*d, t.saturating_duration_since(slept_at)))
        .max()
        .unwrap_or_default();
    let admitted = seen.iter().filter(|(s, ..)| *s == 200).count() as u64;
    let count = |code: u16| seen.iter().filter(|(s, ..)| *s == code).count();
    println!(
        "slow relet: {} requests, {admitted} admitted against rpm {limit}, {} refused, {} denied; \
         longest request {worst:?} (sent {worst_at:?} after Redis fell asleep) while Redis slept {woke:?}",
        seen.len(),
        count(429),
        count(503)
    );
    assert!(
        seen.iter().all(|(s, ..)| [200, 429, 503].contains(s)),
        "{:?}",
        seen.iter().map(|(s, ..)| s).collect::<Vec<_>>()
    );
    // Sent in the first half of the sleep and answered after it: that
    // request waited on Redis.
    let stalled = seen.iter().find(|(_, d, t)| {
        let sent = t.saturating_duration_since(slept_at);
        *t >= slept_at && sent < woke / 2 && sent + *d >= woke
    });
    assert!(stalled.is_none(), "a request waited on Redis: {stalled:?}");
    assert!(count(429) > 0, "the limit was never reached");
    assert!(admitted <= limit, "{admitted} admitted against {limit}");
    assert_eq!(up.count() as u64, admitted);
    // Back in shared mode; the leases the sleep cut short free themselves
    // by their deadline, the others are given back.
    for gw in &gws {
        let shared = gw.state.shared.clone().unwrap();
        assert!(eventually(Duration::from_secs(6), || shared.mode().ok).await);
    }
    assert!(
        eventually(Duration::from_secs(15), || redis
            .live_leases("app")
            .is_empty())
        .await,
        "leases still held: {:?}",
        redis.live_leases("app")
    );
    assert!(redis.window("app", 'r') >= admitted);
}
