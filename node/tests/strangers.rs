//! What strangers can do to a node without the mesh secret, against real `tandem serve`
//! processes: a flood of garbage connections to the mesh port yields a bounded log and events that
//! stay local; silent handshakes from one address do not keep real peers out; hundreds of idle or
//! slow HTTP connections on a node short of file descriptors are
//! closed while `/health` keeps answering; SIGTERM ends the process within the grace period with
//! connections still open; a second node on the same identity is refused at start.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::Node;

const OBSERVER: [&str; 2] = ["--role", "observer"];

/// One at a time: each test loads the machine (floods, hundreds of sockets) or times a process.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The TCP address of a node's first mesh multiaddr (`/ip4/A/tcp/P/p2p/ID`).
fn mesh_socket(node: &Node) -> SocketAddr {
    let addr = node.addr();
    let parts: Vec<&str> = addr.split('/').collect();
    format!("{}:{}", parts[2], parts[4]).parse().expect("an ip4/tcp mesh address")
}

fn http_socket(node: &Node) -> SocketAddr {
    node.http.trim_start_matches("http://").parse().expect("host:port")
}

fn lines_with(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

fn refused_events(cluster: &Value) -> usize {
    cluster["events"].as_array().map_or(0, |e| e.iter().filter(|e| e["kind"] == "refused").count())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_garbage_connections_yields_a_bounded_log_and_events_that_stay_local() {
    let _one = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let victim = Node::start(&OBSERVER, dir.path(), "victim");
    let friend = Node::start(&[&OBSERVER[..], &["--peer", &victim.addr()]].concat(), dir.path(), "friend");
    friend.wait_until_sees(&[&victim, &friend], Duration::from_secs(30)).await;
    let before = victim.plain_log(dir.path(), "victim").lines().count();

    // Thousands of connections that send garbage and hang up, from 16 threads at once.
    let target = mesh_socket(&victim);
    let started = Instant::now();
    let attempts: usize = std::thread::scope(|s| {
        let workers: Vec<_> = (0..16)
            .map(|_| {
                s.spawn(move || {
                    let mut n = 0;
                    while started.elapsed() < Duration::from_secs(6) && n < 400 {
                        if let Ok(mut c) = TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
                            let _ = c.write_all(b"GET / HTTP/1.1\r\n\r\n garbage \x00\xff\x13/multistream/1.0.0\n");
                            n += 1;
                        }
                    }
                    n
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("flood thread")).sum()
    });
    eprintln!("{attempts} garbage connections in {:?}", started.elapsed());
    assert!(attempts >= 500, "the flood reached the node: {attempts}");

    // Failed handshakes end asynchronously: give the last ones time to be counted.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = victim.plain_log(dir.path(), "victim");
    let grown = log.lines().count() - before;
    eprintln!("the flood added {grown} lines to the victim's log");
    assert!(
        grown <= 10,
        "{attempts} refusals wrote {grown} log lines:\n{}",
        log.lines().skip(before).take(40).collect::<Vec<_>>().join("\n")
    );
    assert!(lines_with(&log, "incoming connection failed") >= 1, "the first refusal is still logged, with its reason:\n{log}");
    let events = refused_events(&victim.get("/v1/cluster").await);
    assert!((1..=2).contains(&events), "one refusal event per source per minute, not {events}");

    // Nothing of it reached the friend, which still sees the victim.
    friend.wait_until_sees(&[&victim, &friend], Duration::from_secs(10)).await;
    let cluster = friend.get("/v1/cluster").await;
    assert_eq!(refused_events(&cluster), 0, "refusals are not relayed: {}", cluster["events"]);
    assert_eq!(lines_with(&friend.plain_log(dir.path(), "friend"), "incoming connection failed"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_handshakes_from_one_address_do_not_keep_peers_out() {
    let _one = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let victim = Node::start(&OBSERVER, dir.path(), "victim");
    let target = mesh_socket(&victim);
    // A stranger on 127.0.0.2 keeps opening connections that never say a word, far more than the
    // 64 handshakes the node admits at once.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stranger = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut held = std::collections::VecDeque::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let socket = tokio::net::TcpSocket::new_v4().expect("socket");
                socket.bind("127.0.0.2:0".parse().expect("addr")).expect("bind 127.0.0.2");
                if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(1), socket.connect(target)).await {
                    held.push_back(c);
                }
                if held.len() > 200 {
                    held.pop_front();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            held.len()
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let friend = Node::start(&[&OBSERVER[..], &["--peer", &victim.addr()]].concat(), dir.path(), "friend");
    friend.wait_until_sees(&[&victim, &friend], Duration::from_secs(15)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    eprintln!("the stranger held {} silent connections", stranger.await.expect("stranger"));
    let log = victim.plain_log(dir.path(), "victim");
    assert!(log.contains("127.0.0.2 already has 16 connections mid-handshake"), "the refusal names the source and why:\n{log}");
}

/// Opens `n` connections to `addr`, each sending `first` (possibly nothing).
fn open_many(addr: SocketAddr, n: usize, first: &[u8]) -> Vec<TcpStream> {
    (0..n)
        .filter_map(|_| {
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
            c.write_all(first).ok()?;
            Some(c)
        })
        .collect()
}

/// Whether the server has closed `c` (a read sees end of file or a reset, not a timeout).
fn closed_by_server(mut c: &TcpStream) -> bool {
    let _ = c.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = [0u8; 512];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return true,
            // A 408 or similar on the way out: keep reading to the end.
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return false,
            Err(_) => return true,
        }
    }
}

async fn health(node: &Node) -> Result<u16, String> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().map_err(|e| e.to_string())?;
    client.get(format!("{}/health", node.http)).send().await.map(|r| r.status().as_u16()).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_and_slow_http_connections_are_closed_and_health_still_answers_with_few_descriptors() {
    let _one = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // 128 file descriptors in all: the mesh, the runtime and the log take some of them, so 400
    // idle connections exhaust the process long before the connection cap (1024).
    let prefix = ["bash", "-c", "ulimit -n 128 && exec \"$0\" \"$@\""];
    let args = [&OBSERVER[..], &["--http", "127.0.0.1:0", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"]].concat();
    let args = [&args[..], &["--http-idle-timeout", "3", "--http-read-timeout", "2"]].concat();
    let node = Node::spawn(&prefix, &args, dir.path(), "node");
    assert_eq!(health(&node).await, Ok(200));
    let addr = http_socket(&node);

    let idle = open_many(addr, 300, b"");
    let partial = open_many(addr, 100, b"GET /health HTTP/1.1\r\nHost: x\r\n");
    eprintln!("{} idle and {} half-sent connections open", idle.len(), partial.len());
    assert!(idle.len() + partial.len() >= 300, "the connections were accepted at the TCP level");
    for _ in 0..5 {
        assert_eq!(health(&node).await, Ok(200), "a real client is served while strangers hold connections");
    }

    // A slowloris: a header byte every 300 ms never completes a request in time.
    let mut slow = open_many(addr, 3, b"GET /health HTTP/1.1\r\n");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        for c in &mut slow {
            let _ = c.write_all(b"X");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(slow.iter().all(closed_by_server), "a slowloris is cut off by the read timeout");

    // After the idle timeout every stranger's connection is gone.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let open_idle = idle.iter().filter(|c| !closed_by_server(c)).count();
    let open_partial = partial.iter().filter(|c| !closed_by_server(c)).count();
    assert_eq!((open_idle, open_partial), (0, 0), "idle and half-sent connections are closed by the server");
    assert_eq!(health(&node).await, Ok(200));

    // A body that never arrives gets 408, in OpenAI's error shape.
    let mut c = TcpStream::connect(addr).expect("connect");
    c.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        .expect("write");
    c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut answer = String::new();
    let _ = c.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("invalid_request_error"), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ends_the_process_within_the_grace_period_with_connections_open() {
    let _one = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Node::start(&[&OBSERVER[..], &["--shutdown-grace", "2", "--http-read-timeout", "60"]].concat(), dir.path(), "node");
    assert_eq!(health(&node).await, Ok(200));
    let addr = http_socket(&node);
    let _idle = open_many(addr, 50, b"");
    // A request whose body never comes stays in flight until the grace period ends it.
    let _stuck =
        open_many(addr, 2, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let term = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &node.child.id().to_string()]).status().expect("kill").success());
    let status = loop {
        if let Some(s) = node.child.try_wait().expect("wait") {
            break s;
        }
        assert!(term.elapsed() < Duration::from_secs(8), "the node exits within the grace period (2 s) and a margin");
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("exited {status} after {:?}", term.elapsed());
    assert!(status.success(), "a clean exit: {status}");
    assert!(std::net::TcpListener::bind(addr).is_ok(), "the port is free again");
}

#[test]
fn a_second_node_on_the_same_identity_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = Node::start(&OBSERVER, dir.path(), "same");
    let identity = dir.path().join("same.key");
    let second = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["serve", "--role", "observer", "--http", "127.0.0.1:0", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0", "--identity"])
        .arg(&identity)
        .env("TANDEM_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("runs");
    let out = common::output_within(second, Duration::from_secs(30), "the second node on the same identity");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused: {err}");
    assert!(err.contains("same.key") && err.contains("in use") && err.contains("--identity"), "{err}");
    assert!(err.contains(&first.peer_id), "names the identity's peer id: {err}");
    assert!(!err.contains("panicked"), "{err}");
}
