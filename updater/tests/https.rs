//! Downloads over HTTPS, for real: a test CA and a certificate for
//! 127.0.0.1 made by `openssl`, TLS terminated by `socat` in front of the
//! fault-injecting HTTP server, an HTTP `CONNECT` proxy, and `tandemd` as a
//! process on a private `dbus-daemon`. The CA is trusted through
//! `server.ca_file` only; without it, or with another CA, the update is
//! refused with a clear error and the node is left as it was.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;

use common::{in_days, payload_bytes_served, releases, Node};
use tandem_testkit::http::{Fault, HttpServer};
use tandem_testkit::tls::{ConnectProxy, TestCa, TlsFront};

fn https_config(front: &TlsFront, ca: Option<&std::path::Path>, proxy: Option<&str>) -> String {
    let mut toml = format!("[server]\nindex_url = \"{}\"\n", front.url("stable.json"));
    if let Some(ca) = ca {
        toml.push_str(&format!("ca_file = \"{}\"\n", ca.display()));
    }
    if let Some(proxy) = proxy {
        toml.push_str(&format!("proxy = \"{proxy}\"\n"));
    }
    toml
}

#[test]
fn https_needs_the_configured_ca_and_resumes_through_a_connect_proxy() {
    let rel = releases();
    rel.publish(1, vec![rel.release("2.0.0", false)], in_days(7), None);
    let server = HttpServer::serve(&rel.www);
    let ca = TestCa::new(&rel.www.join(".."), "good");
    let other = TestCa::new(&rel.www.join(".."), "other");
    let front = TlsFront::start(&ca, server.port());
    let mut node = Node::new(&server, &rel);

    // Not trusted: the system store does not know the test CA.
    node.configure("60-https", &https_config(&front, None, None));
    node.start();
    let err = node.ctl_err(&["apply"]);
    assert!(
        err.contains("stable.json") && err.to_lowercase().contains("certificate"),
        "{err}"
    );
    // Another CA is no better.
    node.stop();
    node.configure("60-https", &https_config(&front, Some(&other.ca), None));
    node.start();
    let err = node.ctl_err(&["apply"]);
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // A CA file that is not PEM is an error of its own, named.
    node.stop();
    let junk = rel.www.join("../not-a-ca.pem");
    fs::write(&junk, "not a certificate\n").unwrap();
    node.configure("60-https", &https_config(&front, Some(&junk), None));
    node.start();
    let err = node.ctl_err(&["apply"]);
    assert!(err.contains("not-a-ca.pem"), "{err}");
    // Nothing was written or set: slot B is untouched, A still boots.
    let s = node.status();
    assert_eq!(s["staged"], serde_json::Value::Null, "{s}");
    assert_eq!(s["next_boot"], "A", "{s}");
    assert!(server.log_of("full-2.0.0.tpl").is_empty());

    // Trusted through the configuration, through a CONNECT proxy, with a
    // connection dropped mid-payload: resumed with a Range.
    node.stop();
    let proxy = ConnectProxy::start();
    node.configure(
        "60-https",
        &https_config(&front, Some(&ca.ca), Some(&proxy.url())),
    );
    let name = "full-2.0.0.tpl";
    let size = fs::metadata(rel.www.join(name)).unwrap().len();
    server.fault(name, Fault::DropAfter(size / 3));
    node.start();
    let out = node.ctl_ok(&["apply"]);
    assert!(out.contains("2.0.0 staged in slot B"), "{out}");
    node.assert_staged_v2(&rel);
    let requests = server.log_of(name);
    assert!(
        requests.iter().any(|r| r.range_start.unwrap_or(0) > 0),
        "resumed with a Range: {requests:?}"
    );
    let served = payload_bytes_served(&server, name);
    assert!(served < size + size / 2, "{served} of {size}");
    // Every request went through the proxy's tunnels to the TLS port.
    let tunnels = proxy.tunnels();
    let port = front
        .url("")
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    assert!(tunnels.len() >= 2, "{tunnels:?}");
    assert!(
        tunnels.iter().all(|t| *t == format!("127.0.0.1:{port}")),
        "{tunnels:?}"
    );
}
