//! The institution's HTTP gateway: every end-to-end row answered as the
//! library answers it, in all three modes and in batches; refusals as JSON;
//! the OpenAPI document against the routes; a key rotation ridden out; the
//! query log holding every check, its chain intact.

use super::common::*;
use psi_client::gateway::{self, GatewaySettings, RunningGateway};
use psi_client::querylog;

/// One HTTP/1.1 exchange of JSON on a fresh connection: (status, body).
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let (status, _, body) = exchange(
        addr,
        method,
        path,
        headers,
        "application/json",
        body.as_bytes(),
    )
    .await;
    (status, String::from_utf8_lossy(&body).to_string())
}

/// One HTTP/1.1 exchange on a fresh connection: (status, head, body).
async fn exchange(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    content_type: &str,
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(raw.len());
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let body = raw.get(split + 4..).unwrap_or_default();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        // Chunked: size lines in hex, each followed by that many bytes.
        let mut out = Vec::new();
        let mut rest = body;
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = String::from_utf8_lossy(&rest[..eol]).trim().to_string();
            let n = usize::from_str_radix(&size, 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            let chunk = &rest[eol + 2..];
            out.extend_from_slice(&chunk[..n]);
            rest = chunk[n..].strip_prefix(b"\r\n").unwrap_or(&chunk[n..]);
        }
        out
    } else {
        body.to_vec()
    };
    (status, head, body)
}

fn value(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// A refused call: headers, body, the status and a word its error says.
type Refused<'a> = (Vec<(&'a str, &'a str)>, String, u16, &'a str);

struct Gateway {
    running: RunningGateway,
    token: String,
    log: PathBuf,
}

async fn gateway(
    f: &Fixture,
    settings: impl FnOnce(GatewaySettings) -> GatewaySettings,
) -> Gateway {
    let (token, line) = gateway::new_token("onboarding").unwrap();
    let tokens = f.root.join("tokens.txt");
    std::fs::write(&tokens, format!("# systems\n{line}\n")).unwrap();
    let log = f.root.join("query-log.sqlite");
    let base = GatewaySettings {
        tokens: Some(gateway::load_tokens(&tokens).unwrap()),
        purposes: vec!["kyc-onboarding".into(), "aml-recheck".into()],
        refresh_interval: Duration::from_millis(200),
        ..GatewaySettings::new(
            "127.0.0.1:0".parse().unwrap(),
            "kyc-onboarding",
            log.clone(),
        )
    };
    let running = gateway::start(
        client_options(&f.url, &f.root.join("gw-cache"), None),
        settings(base),
    )
    .await
    .unwrap();
    Gateway {
        running,
        token,
        log,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_answers_every_row_and_logs_every_check() {
    let f = fixture(300).await;
    let g = gateway(&f, |s| GatewaySettings {
        max_body_bytes: 4096,
        max_batch_rows: 50,
        max_upload_bytes: 64 << 10,
        max_upload_rows: 100,
        ..s
    })
    .await;
    let addr = g.running.local_addr;
    let bearer = format!("Bearer {}", g.token);
    let auth = [
        ("Authorization", bearer.as_str()),
        ("X-Staff-Id", "clerk-17"),
    ];
    let mut logged = 0;
    for mode in ["sync", "bucket", "pir"] {
        for q in queries() {
            let body = serde_json::json!({"name": q.name, "id": q.id, "mode": mode}).to_string();
            let (status, text) = http(addr, "POST", "/v1/check", &auth, &body).await;
            assert_eq!(status, 200, "{mode} {}: {text}", q.what);
            let v = value(&text);
            assert_eq!(v["result"], q.expected, "{mode} {}", q.what);
            assert_eq!(v["error"].is_string(), q.expected == "invalid", "{text}");
            if q.expected != "invalid" {
                assert_eq!(v["request_id"].as_str().map(str::len), Some(32), "{text}");
            }
            logged += 1;
        }
    }
    // Batches, as `psi-client batch` answers them.
    for mode in ["sync", "bucket", "pir"] {
        let rows: Vec<_> = queries()
            .iter()
            .map(|q| serde_json::json!({"name": q.name, "id": q.id}))
            .collect();
        let body =
            serde_json::json!({"rows": rows, "mode": mode, "purpose": "aml-recheck"}).to_string();
        let (status, text) = http(addr, "POST", "/v1/batch", &auth, &body).await;
        assert_eq!(status, 200, "{text}");
        let v = value(&text);
        let got: Vec<&str> = v["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["result"].as_str().unwrap())
            .collect();
        let want: Vec<&str> = queries().iter().map(|q| q.expected).collect();
        assert_eq!(got, want, "{mode}");
        logged += rows.len();
    }

    // Uploads: a CSV and a workbook answered as `psi-client batch` answers
    // the same file, sent back as a file; every row logged.
    let input = f.root.join("upload.csv");
    let expected = write_queries(&input, 2);
    let mut uploaded = Vec::new();
    for mode in ["bucket", "sync"] {
        let path = format!("/v1/batch?mode={mode}&purpose=aml-recheck");
        let csv = std::fs::read(&input).unwrap();
        let (status, head, body) = exchange(addr, "POST", &path, &auth, "text/csv", &csv).await;
        assert_eq!(status, 200, "{head}{}", String::from_utf8_lossy(&body));
        assert!(
            head.contains("attachment; filename=\"answers.csv\""),
            "{head}"
        );
        assert!(
            head.contains(&format!("x-psi-rows: {}", expected.len())),
            "{head}"
        );
        let answers = f.root.join(format!("uploaded-{mode}.csv"));
        std::fs::write(&answers, &body).unwrap();
        let got: Vec<String> = read_output(&answers)
            .iter()
            .map(|r| r[4].to_string())
            .collect();
        assert_eq!(got, expected, "{mode}");
        uploaded.push((mode, body));
        logged += expected.len();
    }
    let workbook = f.root.join("upload.xlsx");
    {
        let mut book = rust_xlsxwriter::Workbook::new();
        let sheet = book.add_worksheet();
        sheet.write_string(0, 0, "姓名").unwrap();
        sheet.write_string(0, 1, "身份证号").unwrap();
        for (r, q) in queries().iter().enumerate() {
            let r = u32::try_from(r).unwrap() + 1;
            sheet.write_string(r, 0, q.name).unwrap();
            sheet.write_string(r, 1, q.id).unwrap();
        }
        book.save(&workbook).unwrap();
    }
    let xlsx_type = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet";
    let (status, head, body) = exchange(
        addr,
        "POST",
        "/v1/batch?mode=pir",
        &auth,
        xlsx_type,
        &std::fs::read(&workbook).unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{head}");
    assert!(head.contains(xlsx_type), "{head}");
    let answered = f.root.join("answered.xlsx");
    std::fs::write(&answered, body).unwrap();
    let sheet = psi_files::xlsx::read(&answered, None).unwrap();
    assert_eq!(sheet.header, ["姓名", "身份证号", "result", "error"]);
    let got: Vec<String> = sheet.rows.iter().map(|r| r[2].text()).collect();
    let want: Vec<&str> = queries().iter().map(|q| q.expected).collect();
    assert_eq!(got, want);
    logged += want.len();
    // Uploads refused before anything is asked: nothing logged.
    let too_many = f.root.join("too-many.csv");
    write_queries(&too_many, 40);
    let header_only = b"name,id\n".to_vec();
    let uploads: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "/v1/batch",
            "text/csv",
            std::fs::read(&too_many).unwrap(),
            413,
            "max_upload_rows",
        ),
        ("/v1/batch", "text/csv", header_only, 400, "no rows"),
        (
            "/v1/batch",
            "text/csv",
            b"who,what\n1,2\n".to_vec(),
            400,
            "name",
        ),
        (
            "/v1/batch",
            "text/csv",
            b"name,id\n\xff\xfe\x00,1\n".to_vec(),
            400,
            "not a batch file",
        ),
        (
            "/v1/batch",
            "application/pdf",
            b"%PDF".to_vec(),
            415,
            "text/csv",
        ),
        (
            "/v1/batch?mode=fast",
            "text/csv",
            b"name,id\n".to_vec(),
            400,
            "mode",
        ),
        (
            "/v1/batch?colour=red",
            "text/csv",
            b"name,id\n".to_vec(),
            400,
            "?purpose=&mode=",
        ),
        (
            "/v1/batch",
            "text/csv",
            vec![b'x'; 70_000],
            413,
            "max_upload_bytes",
        ),
    ];
    for (path, kind, body, status, says) in uploads {
        let (got, head, text) = exchange(addr, "POST", path, &auth, kind, &body).await;
        let text = String::from_utf8_lossy(&text);
        assert_eq!(got, status, "{path} {kind}: {head}{text}");
        assert!(
            value(&text)["error"].as_str().unwrap().contains(says),
            "{text}"
        );
    }

    // Refusals: JSON errors with statuses a caller acts on; none logged.
    let body = serde_json::json!({"name": "张伟", "id": "11010519491231002X"}).to_string();
    let cases: Vec<Refused> = vec![
        (
            vec![("X-Staff-Id", "clerk-17")],
            body.clone(),
            401,
            "Authorization",
        ),
        (
            vec![("Authorization", "Bearer nope"), ("X-Staff-Id", "c")],
            body.clone(),
            401,
            "unknown token",
        ),
        (
            vec![("Authorization", bearer.as_str())],
            body.clone(),
            400,
            "X-Staff-Id",
        ),
        (auth.to_vec(), "{\"name\": 1}".into(), 400, "JSON"),
        (
            auth.to_vec(),
            serde_json::json!({"name": "a", "id": "b", "extra": 1}).to_string(),
            400,
            "JSON",
        ),
        (
            auth.to_vec(),
            serde_json::json!({"name": "张伟", "id": "11010519491231002X", "purpose": "marketing"})
                .to_string(),
            400,
            "purpose",
        ),
        (
            auth.to_vec(),
            serde_json::json!({"name": "张伟", "id": "11010519491231002X", "mode": "fast"})
                .to_string(),
            400,
            "mode",
        ),
        (
            auth.to_vec(),
            format!("{{\"name\": \"{}\", \"id\": \"x\"}}", "x".repeat(5000)),
            413,
            "max_body_bytes",
        ),
    ];
    for (headers, body, status, says) in cases {
        let (got, text) = http(addr, "POST", "/v1/check", &headers, &body).await;
        assert_eq!(got, status, "{text}");
        assert!(
            value(&text)["error"].as_str().unwrap().contains(says),
            "{text}"
        );
    }
    let many: Vec<_> = (0..51)
        .map(|_| serde_json::json!({"name": "a", "id": "b"}))
        .collect();
    let (got, text) = http(
        addr,
        "POST",
        "/v1/batch",
        &auth,
        &serde_json::json!({"rows": many}).to_string(),
    )
    .await;
    assert_eq!(got, 400, "{text}");
    assert!(text.contains("max_batch_rows = 50"), "{text}");

    // Status, health, metrics, and the OpenAPI document against the routes.
    let (got, text) = http(addr, "GET", "/v1/status", &auth, "").await;
    assert_eq!(got, 200, "{text}");
    assert_eq!(value(&text)["key_epoch"], 1);
    assert_eq!(http(addr, "GET", "/healthz", &[], "").await.0, 200);
    let (got, text) = http(addr, "GET", "/metrics", &[], "").await;
    assert_eq!(got, 200);
    assert!(
        text.contains("psi_gateway_calls_total{route=\"/v1/check\",status=\"200\"}"),
        "{text}"
    );
    let (got, text) = http(addr, "GET", "/openapi.json", &[], "").await;
    assert_eq!(got, 200);
    let served = value(&text);
    let on_disk: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/openapi.json"
        ))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(served, on_disk);
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, item) in on_disk["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.push((method.clone(), path.clone()));
        }
    }
    documented.sort();
    let mut routes: Vec<(String, String)> = gateway::ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_string(), (*p).to_string()))
        .collect();
    routes.sort();
    assert_eq!(
        documented, routes,
        "docs/openapi.json documents exactly the routes"
    );
    for (method, path) in gateway::ROUTES {
        let (got, _) = http(addr, &method.to_uppercase(), path, &auth, "{}").await;
        assert_ne!(got, 404, "{method} {path} is served");
    }

    // The query log: one record per check, the staff id and system named,
    // the chain intact, readable by its owner only.
    g.running.shutdown().await.unwrap();
    assert_eq!(querylog::verify(&g.log).unwrap(), logged as u64);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&g.log).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Accountability without disclosure: the period's openings check out
    // against the operator's audit chain; changed, left-out and added
    // entries are found; another institution's requests are not these.
    let openings = querylog::open(&g.log, 0, i64::MAX).unwrap();
    let audit = f.data_dir.join("audit.sqlite");
    let text = serde_json::to_string(&openings).unwrap();
    let ok = psi_server::serving::audit::check_openings(&audit, "local", &text).unwrap();
    assert!(ok.requests > 0 && ok.entries > 0, "{ok:?}");
    assert_eq!(
        ok.entries,
        openings
            .groups
            .iter()
            .map(|g| g.records.len() as u64)
            .sum::<u64>()
    );
    let mut changed = openings.clone();
    changed.groups[0].records[0].name.push('x');
    let err = psi_server::serving::audit::check_openings(
        &audit,
        "local",
        &serde_json::to_string(&changed).unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("do not make its commitment"), "{err}");
    let mut left_out = openings.clone();
    left_out.groups.remove(0);
    let err = psi_server::serving::audit::check_openings(
        &audit,
        "local",
        &serde_json::to_string(&left_out).unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("is not opened"), "{err}");
    let mut added = openings.clone();
    let mut fake = added.groups[0].clone();
    fake.records[0].salt = "00".repeat(32);
    fake.commitment = hex::encode(psi_core::commitment::commit(&[fake.records[0]
        .entry()
        .unwrap()]));
    added.groups.push(fake);
    let err = psi_server::serving::audit::check_openings(
        &audit,
        "local",
        &serde_json::to_string(&added).unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("no request of local in the period carried it"),
        "{err}"
    );
    assert!(psi_server::serving::audit::check_openings(&audit, "bank-b", &text).is_err());
    // The uploads' answers are byte for byte those of `psi-client batch`
    // over the same file (asked after the openings were checked: these
    // requests are not in the query log).
    let session = connect(&f.url, &f.root.join("batch-cache"), None)
        .await
        .unwrap();
    for (mode, body) in uploaded {
        let query_mode = match mode {
            "sync" => QueryMode::Sync,
            _ => QueryMode::Bucket,
        };
        let reference = f.root.join(format!("reference-{mode}.csv"));
        let opts = options(&input, &reference, query_mode, 5);
        psi_client::batch::run(&session, &opts).await.unwrap();
        assert_eq!(body, std::fs::read(&reference).unwrap(), "{mode}");
    }
    let db = rusqlite::Connection::open(&g.log).unwrap();
    let (staff, caller): (String, String) = db
        .query_row(
            "SELECT staff, caller FROM querylog WHERE seq = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (staff.as_str(), caller.as_str()),
        ("clerk-17", "onboarding")
    );
    f.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_rides_out_a_key_rotation() {
    let f = fixture(50).await;
    let g = gateway(&f, |s| s).await;
    let addr = g.running.local_addr;
    let bearer = format!("Bearer {}", g.token);
    let auth = [
        ("Authorization", bearer.as_str()),
        ("X-Staff-Id", "clerk-2"),
    ];
    let ask = || async {
        let body = serde_json::json!({"name": "张伟", "id": "11010519491231002X"}).to_string();
        let (status, text) = http(addr, "POST", "/v1/check", &auth, &body).await;
        assert_eq!(status, 200, "{text}");
        value(&text)
    };
    assert_eq!(ask().await["key_epoch"], 1);
    let data = f.data_dir.clone();
    tokio::task::spawn_blocking(move || registry::rotate_key(&data, Duration::ZERO, false))
        .await
        .unwrap()
        .unwrap();
    let mut epoch = 1;
    for _ in 0..100 {
        let v = ask().await;
        assert_eq!(v["result"], "match");
        epoch = v["key_epoch"].as_u64().unwrap();
        if epoch == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(epoch, 2, "the gateway follows the endorsed rotation");
    g.running.shutdown().await.unwrap();
    f.running.shutdown().await.unwrap();
}

/// A Chrome DevTools Protocol session over the page's websocket.
struct Devtools {
    ws: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>,
    next: u64,
}

impl Devtools {
    fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.next += 1;
        let id = self.next;
        let msg = serde_json::json!({"id": id, "method": method, "params": params});
        self.ws
            .send(tungstenite::Message::text(msg.to_string()))
            .unwrap();
        loop {
            let reply = self.ws.read().unwrap();
            let Ok(text) = reply.to_text() else { continue };
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    fn eval(&mut self, expression: &str) -> serde_json::Value {
        self.call(
            "Runtime.evaluate",
            serde_json::json!({"expression": expression, "returnByValue": true}),
        )["result"]["value"]
            .clone()
    }

    /// Types `text` into the field `id` through the browser's input pipeline.
    fn type_into(&mut self, id: &str, text: &str) {
        self.eval(&format!("document.getElementById('{id}').focus()"));
        self.call("Input.insertText", serde_json::json!({"text": text}));
    }

    fn wait_for(&mut self, expression: &str) -> serde_json::Value {
        for _ in 0..200 {
            let v = self.eval(expression);
            if !v.is_null() && v != false && v != "" && v != "…" {
                return v;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the page never satisfied {expression}");
    }
}

/// The front-desk page in a real headless Chromium: a clerk types a pair
/// and submits; the page shows the answer in words, the request id, and
/// keeps nothing in the browser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_front_desk_page_answers_in_a_real_browser() {
    let Some(chromium) = ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|b| which(b))
    else {
        eprintln!("the_front_desk_page_answers_in_a_real_browser: skipped: no chromium on PATH (.ci/run installs Debian's)");
        return;
    };
    let f = fixture(30).await;
    let g = gateway(&f, |s| s).await;
    let url = format!("http://{}/", g.running.local_addr);
    let token = g.token.clone();
    let profile = f.root.join("chromium-profile");
    let port = psi_testbed::free_port();
    let mut browser = std::process::Command::new(chromium)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            &format!("--remote-debugging-port={port}"),
            &format!("--user-data-dir={}", profile.display()),
            "about:blank",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let answers = tokio::task::spawn_blocking(move || {
        let mut ws_url = None;
        psi_testbed::wait_for("chromium's devtools", Duration::from_secs(30), || {
            ws_url = devtools_list(port).and_then(|body| {
                let start = body.find('[')?;
                let list: serde_json::Value = serde_json::from_str(&body[start..]).ok()?;
                list.as_array()?
                    .iter()
                    .find(|t| t["type"] == "page")?["webSocketDebuggerUrl"]
                    .as_str()
                    .map(str::to_string)
            });
            ws_url.is_some()
        });
        let (ws, _) = tungstenite::connect(ws_url.unwrap()).unwrap();
        let mut dt = Devtools { ws, next: 0 };
        dt.call("Page.enable", serde_json::json!({}));
        dt.call("Page.navigate", serde_json::json!({"url": url}));
        dt.wait_for("document.readyState === 'complete' && document.getElementById('purpose').options.length > 0");
        let mut seen = Vec::new();
        for (name, id) in [("张伟", "11010519491231002X"), ("张伟", "11010519491231002")] {
            dt.type_into("staff", "desk-3");
            dt.eval("document.getElementById('token').value = ''");
            dt.type_into("token", &token);
            dt.type_into("name", name);
            dt.type_into("id", id);
            dt.eval("document.getElementById('answer').textContent = ''");
            dt.eval("document.getElementById('submit').click()");
            let text = dt.wait_for("document.getElementById('answer').textContent");
            seen.push(text.as_str().unwrap_or_default().to_string());
            dt.eval("document.getElementById('staff').value = ''");
        }
        let stored = dt.eval("localStorage.length + sessionStorage.length + document.cookie.length");
        (seen, stored)
    })
    .await;
    let _ = browser.kill();
    let _ = browser.wait();
    let (seen, stored) = answers.unwrap();
    assert!(seen[0].starts_with("一致 · Match"), "{seen:?}");
    assert!(seen[0].contains("request id"), "{seen:?}");
    assert!(seen[1].starts_with("无效 · Invalid"), "{seen:?}");
    assert_eq!(stored, 0, "nothing kept in the browser");
    g.running.shutdown().await.unwrap();
    // Both checks are in the query log under the clerk's staff id.
    assert_eq!(querylog::verify(&g.log).unwrap(), 2);
    f.running.shutdown().await.unwrap();
}

/// Chromium's list of debuggable targets (its HTTP server answers HTTP/1.1
/// only, and keeps the connection open: read to the Content-Length).
fn devtools_list(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(
        format!("GET /json/list HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .ok()?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok())?;
            if body.len() >= len {
                return Some(body.to_string());
            }
        }
    }
    None
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

/// The operator's server goes away and comes back: meanwhile the gateway
/// answers 503 with a JSON error (logged as an error, nothing answered),
/// then answers again without a restart of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_rides_out_a_server_restart() {
    let f = fixture(20).await;
    let port = f.running.local_addr.port();
    let g = gateway(&f, |s| GatewaySettings {
        request_timeout: Duration::from_secs(5),
        ..s
    })
    .await;
    let addr = g.running.local_addr;
    let bearer = format!("Bearer {}", g.token);
    let auth = [
        ("Authorization", bearer.as_str()),
        ("X-Staff-Id", "clerk-4"),
    ];
    let body = serde_json::json!({"name": "张伟", "id": "11010519491231002X"}).to_string();
    let (status, _) = http(addr, "POST", "/v1/check", &auth, &body).await;
    assert_eq!(status, 200);
    f.running.shutdown().await.unwrap();
    let (status, text) = http(addr, "POST", "/v1/check", &auth, &body).await;
    assert!(
        status == 503 || status == 504,
        "the operator away: {status} {text}"
    );
    assert!(value(&text)["error"].is_string(), "{text}");
    let again = start(&f.data_dir, port).await;
    let mut status = 0;
    for _ in 0..100 {
        let (s, text) = http(addr, "POST", "/v1/check", &auth, &body).await;
        status = s;
        if s == 200 {
            assert_eq!(value(&text)["result"], "match");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200, "answered again once the server is back");
    g.running.shutdown().await.unwrap();
    // Every call is in the log, the refused one as an error.
    let db = rusqlite::Connection::open(&g.log).unwrap();
    let errors: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM querylog WHERE result = 'error'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(errors >= 1);
    querylog::verify(&g.log).unwrap();
    again.shutdown().await.unwrap();
}

/// `psi-client batch --query-log`: each chunk's requests carry the
/// commitment to its rows' records, so the regulator's check of a batch's
/// openings holds in every mode; a changed record is found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logged_batch_commits_to_each_chunk() {
    let f = fixture(40).await;
    let input = f.root.join("in.csv");
    let expected = write_queries(&input, 2);
    let target = querylog::LogTarget {
        log: querylog::QueryLog::open(&f.root.join("log.sqlite")).unwrap(),
        staff: "batch-clerk".into(),
        caller: "psi-client batch".into(),
        purpose: "kyc-onboarding".into(),
    };
    let session = connect(&f.url, &f.root.join("cache"), None).await.unwrap();
    let chunk_rows = 7;
    for mode in [QueryMode::Sync, QueryMode::Bucket, QueryMode::Pir] {
        let output = f.root.join(format!("out-{mode:?}.csv"));
        let opts = options(&input, &output, mode, chunk_rows);
        psi_client::batch::run_logged(&session, &opts, Some(&target))
            .await
            .unwrap();
        let got: Vec<String> = read_output(&output)
            .iter()
            .map(|r| r[4].to_string())
            .collect();
        assert_eq!(got, expected, "{mode:?}");
    }
    let n = querylog::verify(&f.root.join("log.sqlite")).unwrap();
    assert_eq!(n, 3 * expected.len() as u64);
    let openings = querylog::open(&f.root.join("log.sqlite"), 0, i64::MAX).unwrap();
    // One commitment a chunk that sent anything.
    let chunks = expected.len().div_ceil(chunk_rows);
    assert!(
        openings.groups.len() <= 3 * chunks && openings.groups.len() >= 3 * (chunks - 1),
        "{} groups for {chunks} chunks a mode",
        openings.groups.len()
    );
    assert!(openings
        .groups
        .iter()
        .all(|g| g.records.len() <= chunk_rows));
    let text = serde_json::to_string(&openings).unwrap();
    let audit = f.data_dir.join("audit.sqlite");
    let ok = psi_server::serving::audit::check_openings(&audit, "local", &text).unwrap();
    assert!(ok.requests >= openings.groups.len() as u64, "{ok:?}");
    let mut changed = openings.clone();
    changed.groups[3].records[1].id.push('1');
    let err = psi_server::serving::audit::check_openings(
        &audit,
        "local",
        &serde_json::to_string(&changed).unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("group 4"), "{err}");
    f.running.shutdown().await.unwrap();
}

/// The query log in the institution's PostgreSQL, shared by two gateways
/// answering at once: one chain, every check in it, the regulator's check
/// of its openings holds; a record changed in the database is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_log_in_postgresql_is_shared_by_two_gateways() {
    use psi_testbed::{start_postgres, Durability};
    let pg = match tokio::task::spawn_blocking(|| start_postgres(Durability::Volatile))
        .await
        .unwrap()
    {
        Ok(pg) => pg,
        Err(why) => {
            println!("SKIPPED: no PostgreSQL server could be started here: {why}");
            return;
        }
    };
    let url = pg.url.clone();
    let sql = move |statement: &'static str| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            c.batch_execute(statement).unwrap();
        })
    };
    sql("DROP TABLE IF EXISTS querylog, querylog_anchor")
        .await
        .unwrap();
    let f = fixture(50).await;
    let log = PathBuf::from(&pg.url);
    let a = gateway(&f, |s| GatewaySettings {
        query_log: log.clone(),
        ..s
    })
    .await;
    let b = gateway(&f, |s| GatewaySettings {
        query_log: log.clone(),
        ..s
    })
    .await;
    let ask = |g: &Gateway, staff: &'static str| {
        let addr = g.running.local_addr;
        let bearer = format!("Bearer {}", g.token);
        async move {
            for q in queries() {
                let body = serde_json::json!({"name": q.name, "id": q.id}).to_string();
                let auth = [("Authorization", bearer.as_str()), ("X-Staff-Id", staff)];
                let (status, text) = http(addr, "POST", "/v1/check", &auth, &body).await;
                assert_eq!(status, 200, "{text}");
                assert_eq!(value(&text)["result"], q.expected, "{}", q.what);
            }
        }
    };
    tokio::join!(ask(&a, "clerk-a"), ask(&b, "clerk-b"));
    a.running.shutdown().await.unwrap();
    b.running.shutdown().await.unwrap();
    let checks = 2 * queries().len() as u64;
    let path = log.clone();
    let n = tokio::task::spawn_blocking(move || querylog::verify(&path))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, checks);
    let path = log.clone();
    let openings = tokio::task::spawn_blocking(move || querylog::open(&path, 0, i64::MAX))
        .await
        .unwrap()
        .unwrap();
    let text = serde_json::to_string(&openings).unwrap();
    let audit = f.data_dir.join("audit.sqlite");
    psi_server::serving::audit::check_openings(&audit, "local", &text).unwrap();
    sql("UPDATE querylog SET name = name || 'x' WHERE seq = 3")
        .await
        .unwrap();
    let path = log.clone();
    let err = tokio::task::spawn_blocking(move || querylog::verify(&path))
        .await
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(err.contains("record 3"), "{err}");
    f.running.shutdown().await.unwrap();
}
