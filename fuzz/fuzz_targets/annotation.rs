//! The node annotation `acl.azure.com/update-request` (JSON), as the agent
//! parses it. The protocol is a pure module of the agent crate; it is
//! compiled here from its own source, so the fuzz build does not need the
//! agent's Kubernetes client.
#![no_main]
#[allow(dead_code)]
#[path = "../../agent/src/protocol.rs"]
mod protocol;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = protocol::parse_request(text);
});
