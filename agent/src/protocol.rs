//! The node annotation protocol that AKS plans for Azure Container Linux
//! in-place updates, as tandem speaks it: a request annotation written by
//! whoever drives the node (AKS, or tandem-operator) and a status
//! annotation written only by the node's agent. Pure: parsing, checking
//! and the JSON shapes.

use serde::{Deserialize, Serialize};

/// The annotation a driver writes to ask for an operation.
pub const REQUEST_ANNOTATION: &str = "acl.azure.com/update-request";
/// The annotation the agent writes with the outcome.
pub const STATUS_ANNOTATION: &str = "acl.azure.com/update-status";
/// The label the agent keeps at the booted version.
pub const VERSION_LABEL: &str = "tandem.dev/booted-version";
/// The only schema version this agent speaks.
pub const SCHEMA_VERSION: &str = "1.0";
/// The longest operation id accepted.
const MAX_OPERATION_ID: usize = 128;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestOperation {
    /// Download, write and verify the target into the inactive slot; no
    /// boot entry changes.
    Stage,
    /// Set the staged target to boot next and reboot.
    Finalize,
    /// Boot the other (good) slot next and reboot.
    Rollback,
}

/// What a status reports on: a request's operation, or the commit that
/// follows a finalize once the new image's health is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatusOperation {
    Stage,
    Finalize,
    Rollback,
    Commit,
}

impl From<RequestOperation> for StatusOperation {
    fn from(op: RequestOperation) -> Self {
        match op {
            RequestOperation::Stage => StatusOperation::Stage,
            RequestOperation::Finalize => StatusOperation::Finalize,
            RequestOperation::Rollback => StatusOperation::Rollback,
        }
    }
}

/// The outcome codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Code {
    InProgress,
    Success,
    AlreadyAtTarget,
    NotStaged,
    OperationFailed,
    RevertedToPrevious,
    AgentInternalError,
    InvalidRequest,
}

impl Code {
    /// Whether the operation is over (anything but `InProgress`).
    pub fn is_final(self) -> bool {
        self != Code::InProgress
    }
}

/// `acl.azure.com/update-request`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateRequest {
    pub schema_version: String,
    pub node_update_id: String,
    pub operation_id: String,
    pub operation: RequestOperation,
    /// Required for stage and finalize, absent for rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_version: Option<String>,
}

/// `acl.azure.com/update-status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateStatus {
    pub schema_version: String,
    pub node_update_id: String,
    pub operation_id: String,
    pub operation: StatusOperation,
    pub code: Code,
    pub message: String,
    pub from_version: Option<String>,
    pub to_version: Option<String>,
    #[serde(rename = "startedUtc")]
    pub started_utc: String,
    #[serde(rename = "finishedUtc")]
    pub finished_utc: Option<String>,
}

/// A request that could not be accepted, with what could be read of it
/// (so the status can name the operation it refuses).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{why}")]
pub struct Invalid {
    pub node_update_id: String,
    pub operation_id: String,
    pub why: String,
}

/// The operation id of the commit that follows finalize `operation_id`.
pub fn commit_id(operation_id: &str) -> String {
    format!("{operation_id}.commit")
}

/// Whether `s` is a UUID in its canonical text form (8-4-4-4-12 hex).
pub fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Parses and checks a request annotation. Pure.
pub fn parse_request(text: &str) -> Result<UpdateRequest, Invalid> {
    let ids = |why: String| {
        let value: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
        let field = |name: &str| {
            value
                .get(name)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        Invalid {
            node_update_id: field("nodeUpdateId"),
            operation_id: field("operationId"),
            why,
        }
    };
    let request: UpdateRequest =
        serde_json::from_str(text).map_err(|e| ids(format!("the request is not valid: {e}")))?;
    check_request(&request).map_err(ids)?;
    Ok(request)
}

fn check_request(r: &UpdateRequest) -> Result<(), String> {
    if r.schema_version != SCHEMA_VERSION {
        return Err(format!(
            "schemaVersion {:?} is not supported (this agent speaks {SCHEMA_VERSION})",
            r.schema_version
        ));
    }
    if !is_uuid(&r.node_update_id) {
        return Err(format!("nodeUpdateId {:?} is not a UUID", r.node_update_id));
    }
    if r.operation_id.is_empty()
        || r.operation_id.len() > MAX_OPERATION_ID
        || r.operation_id.chars().any(char::is_control)
    {
        return Err(format!(
            "operationId must be 1 to {MAX_OPERATION_ID} printable characters"
        ));
    }
    match (r.operation, &r.target_version) {
        (RequestOperation::Rollback, Some(_)) => {
            Err("targetVersion must be absent for rollback".into())
        }
        (RequestOperation::Stage | RequestOperation::Finalize, None) => Err(format!(
            "targetVersion is required for {}",
            op_name(r.operation.into())
        )),
        (_, Some(v)) if !valid_version(v) => Err(format!("targetVersion {v:?} is not a version")),
        _ => Ok(()),
    }
}

/// A version as tandem's indexes name them: 1 to 64 of `[A-Za-z0-9._+-]`.
fn valid_version(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
}

pub fn op_name(op: StatusOperation) -> &'static str {
    match op {
        StatusOperation::Stage => "stage",
        StatusOperation::Finalize => "finalize",
        StatusOperation::Rollback => "rollback",
        StatusOperation::Commit => "commit",
    }
}

/// A label value for a version: at most 63 of `[A-Za-z0-9._-]`, starting
/// and ending with an alphanumeric (`+` becomes `_`). Pure.
pub fn version_label(version: &str) -> String {
    let mapped: String = version
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(63)
        .collect();
    mapped
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2c1a9e-8b7d-4c6e-9f10-1234567890ab";

    fn request(json: serde_json::Value) -> Result<UpdateRequest, Invalid> {
        parse_request(&json.to_string())
    }

    #[test]
    fn well_formed_requests_parse() {
        let r = request(serde_json::json!({
            "schemaVersion": "1.0", "nodeUpdateId": ID, "operationId": "op-1",
            "operation": "stage", "targetVersion": "4230.2.1"
        }))
        .unwrap();
        assert_eq!(r.operation, RequestOperation::Stage);
        assert_eq!(r.target_version.as_deref(), Some("4230.2.1"));
        let r = request(serde_json::json!({
            "schemaVersion": "1.0", "nodeUpdateId": ID, "operationId": "op-2",
            "operation": "rollback"
        }))
        .unwrap();
        assert_eq!(r.operation, RequestOperation::Rollback);
        // And it serializes back to the same shape.
        let back: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(
            back,
            serde_json::json!({"schemaVersion": "1.0", "nodeUpdateId": ID,
                "operationId": "op-2", "operation": "rollback"})
        );
    }

    #[test]
    fn malformed_requests_are_refused_with_what_could_be_read() {
        let cases = [
            (
                serde_json::json!({"schemaVersion": "1.0", "nodeUpdateId": ID, "operationId": "a",
                    "operation": "stage", "targetVersion": "1", "extra": 1}),
                "unknown field",
            ),
            (
                serde_json::json!({"schemaVersion": "2.0", "nodeUpdateId": ID, "operationId": "a",
                    "operation": "stage", "targetVersion": "1"}),
                "schemaVersion",
            ),
            (
                serde_json::json!({"schemaVersion": "1.0", "nodeUpdateId": "nope", "operationId": "a",
                    "operation": "stage", "targetVersion": "1"}),
                "not a UUID",
            ),
            (
                serde_json::json!({"schemaVersion": "1.0", "nodeUpdateId": ID, "operationId": "a",
                    "operation": "stage"}),
                "required for stage",
            ),
            (
                serde_json::json!({"schemaVersion": "1.0", "nodeUpdateId": ID, "operationId": "a",
                    "operation": "finalize"}),
                "required for finalize",
            ),
            (
                serde_json::json!({"schemaVersion": "1.0", "nodeUpdateId": ID, "operationId": "a",
                    "operation": "rollback", "targetVersion": "1"}),
                "absent for rollback",
            ),
            (
                serde_json::json!({"schemaVersion": "1.0", "nodeUpdateId": ID, "operationId": "a",
                    "operation": "reimage", "targetVersion": "1"}),
                "unknown variant",
            ),
            (
                serde_json::json!({"schemaVersion": "1.0", "nodeUpdateId": ID, "operationId": "",
                    "operation": "rollback"}),
                "operationId",
            ),
            (
                serde_json::json!({"schemaVersion": "1.0", "nodeUpdateId": ID, "operationId": "a",
                    "operation": "stage", "targetVersion": "1 && rm"}),
                "not a version",
            ),
        ];
        for (json, want) in cases {
            let e = request(json.clone()).unwrap_err();
            assert!(e.why.contains(want), "{json}: {}", e.why);
            if json["nodeUpdateId"] == ID {
                assert_eq!(e.node_update_id, ID);
            }
        }
        let e = parse_request("{not json").unwrap_err();
        assert_eq!(
            (e.node_update_id.as_str(), e.operation_id.as_str()),
            ("", "")
        );
    }

    #[test]
    fn statuses_have_the_protocol_shape() {
        let s = UpdateStatus {
            schema_version: SCHEMA_VERSION.into(),
            node_update_id: ID.into(),
            operation_id: commit_id("op-1"),
            operation: StatusOperation::Commit,
            code: Code::RevertedToPrevious,
            message: "health failed".into(),
            from_version: Some("1.0.0".into()),
            to_version: Some("2.0.0".into()),
            started_utc: "2026-12-02T10:00:00Z".into(),
            finished_utc: None,
        };
        let v = serde_json::to_value(&s).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut want = [
            "schemaVersion",
            "nodeUpdateId",
            "operationId",
            "operation",
            "code",
            "message",
            "fromVersion",
            "toVersion",
            "startedUtc",
            "finishedUtc",
        ];
        want.sort_unstable();
        let mut got = keys.clone();
        got.sort_unstable();
        assert_eq!(got, want);
        assert_eq!(v["operation"], "commit");
        assert_eq!(v["code"], "RevertedToPrevious");
        assert_eq!(v["operationId"], "op-1.commit");
        let back: UpdateStatus = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn uuids_and_labels() {
        assert!(is_uuid(ID));
        assert!(is_uuid(&ID.to_uppercase()));
        assert!(!is_uuid("3f2c1a9e-8b7d-4c6e-9f10-1234567890a"));
        assert!(!is_uuid("3f2c1a9e8b7d4c6e9f101234567890ab"));
        assert_eq!(version_label("4230.2.1"), "4230.2.1");
        assert_eq!(version_label("1.0.0+build.5"), "1.0.0_build.5");
        assert_eq!(version_label(&"9".repeat(80)).len(), 63);
        assert_eq!(version_label("-x-"), "x");
    }
}
