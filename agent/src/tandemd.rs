//! tandemd over D-Bus: its status document and the operations the agent
//! runs. Every call makes its own connection, so a tandemd (or bus)
//! restart between calls costs nothing but that call.

use std::time::Duration;

use crate::decide::Tandem;

const NAME: &str = "org.tandem.Update1";
const PATH: &str = "/org/tandem/Update1";

/// Why a call to tandemd did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// tandemd (or the bus) is not there now: try again later.
    #[error("tandemd cannot be reached: {0}")]
    Unreachable(String),
    /// tandemd is busy with another operation: try again later.
    #[error("tandemd is busy: {0}")]
    Busy(String),
    /// tandemd refused or failed the operation.
    #[error("{0}")]
    Failed(String),
}

fn classify(e: zbus::Error) -> CallError {
    match &e {
        zbus::Error::MethodError(name, detail, _) => {
            let text = detail.clone().unwrap_or_else(|| name.to_string());
            if name.as_str().ends_with("LimitsExceeded") {
                CallError::Busy(text)
            } else if name.as_str().ends_with("ServiceUnknown")
                || name.as_str().ends_with("NameHasNoOwner")
                || name.as_str().ends_with("NoReply")
            {
                CallError::Unreachable(text)
            } else {
                CallError::Failed(text)
            }
        }
        zbus::Error::FDO(f) => match **f {
            zbus::fdo::Error::LimitsExceeded(_) => CallError::Busy(f.to_string()),
            zbus::fdo::Error::ServiceUnknown(_)
            | zbus::fdo::Error::NameHasNoOwner(_)
            | zbus::fdo::Error::NoReply(_) => CallError::Unreachable(f.to_string()),
            _ => CallError::Failed(f.to_string()),
        },
        _ => CallError::Unreachable(e.to_string()),
    }
}

async fn proxy() -> Result<zbus::Proxy<'static>, CallError> {
    let conn = zbus::Connection::system()
        .await
        .map_err(|e| CallError::Unreachable(format!("the system bus: {e}")))?;
    zbus::Proxy::new(&conn, NAME, PATH, NAME)
        .await
        .map_err(classify)
}

/// tandemd's status document.
pub async fn status() -> Result<serde_json::Value, CallError> {
    let text: String = proxy()
        .await?
        .call("GetStatus", &())
        .await
        .map_err(classify)?;
    serde_json::from_str(&text).map_err(|e| CallError::Failed(format!("tandemd's status: {e}")))
}

/// Starts a stage of `version`; returns once tandemd has it staged.
/// `Unreachable` while tandemd restarts (it resumes the write itself).
pub async fn stage(version: &str, poll: Duration) -> Result<String, CallError> {
    let id: u64 = proxy()
        .await?
        .call("Stage", &(version, "", false))
        .await
        .map_err(classify)?;
    loop {
        tokio::time::sleep(poll).await;
        let s = status().await?;
        let t = Tandem::from_status(&s);
        if t.busy {
            continue;
        }
        if t.staged.as_ref().is_some_and(|(v, _)| v == version) {
            return Ok(format!("{version} is staged"));
        }
        let result = &s["last_result"];
        if result["id"].as_u64() == Some(id) && result["ok"] == false {
            return Err(CallError::Failed(
                result["message"]
                    .as_str()
                    .unwrap_or("the stage failed")
                    .to_owned(),
            ));
        }
        // tandemd restarted and lost our operation without staging it.
        return Err(CallError::Unreachable(format!(
            "tandemd no longer stages {version}"
        )));
    }
}

/// Sets the staged update next and reboots through tandemd's reboot action.
pub async fn finalize() -> Result<String, CallError> {
    proxy()
        .await?
        .call("Finalize", &(true,))
        .await
        .map_err(classify)
}

/// Boots the other slot next, then reboots through the reboot action.
pub async fn rollback() -> Result<String, CallError> {
    let p = proxy().await?;
    let m: String = p.call("Rollback", &()).await.map_err(classify)?;
    let r: String = p.call("Finalize", &(true,)).await.map_err(classify)?;
    Ok(format!("{m}; {r}"))
}
