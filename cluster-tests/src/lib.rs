//! A real Kubernetes control plane on 127.0.0.1 for the cluster tests:
//! etcd, kube-apiserver and kube-controller-manager (the disruption
//! controller, which computes PodDisruptionBudget status, and garbage
//! collection), built from their Go modules by `cargo xtask cluster-build`
//! and found through `$TANDEM_CONTROL_PLANE` (its `bin/` folder).
//!
//! There is no kubelet. What a kubelet would do for the tests' nodes and
//! pods (a node's Ready condition, a pod's Ready status, removing a pod
//! that was evicted) is played by [`Kubelet`], a simulation named as such;
//! every object is still a real API object in a real API server.
//!
//! A missing binary is a test failure with a clear message, never a skip.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tandem_testkit::fleetlock::free_port;
use tandem_testkit::tls::openssl;
use tandem_testkit::TempDir;

/// Users of the static token file, each with its own kubeconfig.
pub const USERS: [(&str, &str); 3] = [
    ("admin", "system:masters"),
    ("tandem-agent", "tandem:agents"),
    ("tandem-operator", "tandem:operators"),
];

/// The control plane's `bin/` folder.
pub fn bin_dir() -> PathBuf {
    let dir = std::env::var_os("TANDEM_CONTROL_PLANE")
        .map(PathBuf::from)
        .expect(
            "TANDEM_CONTROL_PLANE is not set: run the cluster tests through `cargo xtask test` \
         (or `cargo xtask cluster-build`, which prints the folder to set)",
        );
    for b in ["etcd", "kube-apiserver", "kube-controller-manager"] {
        assert!(
            dir.join(b).is_file(),
            "{} is missing: `cargo xtask cluster-build` builds it",
            dir.join(b).display()
        );
    }
    dir
}

/// A running control plane; stopped when dropped.
#[derive(Debug)]
pub struct ControlPlane {
    pub dir: TempDir,
    pub url: String,
    bin: PathBuf,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    controllers: Option<Child>,
    port: u16,
    etcd_port: u16,
}

fn spawn(bin: &Path, name: &str, args: &[String], log: &Path) -> Child {
    let log = fs::File::create(log).unwrap();
    Command::new(bin.join(name))
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"))
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver (client certificates and static tokens,
    /// RBAC) and kube-controller-manager; returns when the API server is
    /// ready.
    pub fn start() -> ControlPlane {
        let bin = bin_dir();
        let dir = TempDir::new("cluster");
        let d = dir.path();
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=tandem-test-ca",
            ],
        );
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=kube-apiserver",
            ],
        );
        fs::write(d.join("ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "2",
                "-extfile",
                "ext",
            ],
        );
        openssl(d, &["genrsa", "-out", "sa.key", "2048"]);
        openssl(d, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
        let tokens: String = USERS
            .iter()
            .map(|(user, group)| format!("{user}-token,{user},{user},\"{group}\"\n"))
            .collect();
        fs::write(d.join("tokens.csv"), tokens).unwrap();
        let port = free_port();
        let url = format!("https://127.0.0.1:{port}");
        for (user, _) in USERS {
            fs::write(
                d.join(format!("{user}.kubeconfig")),
                format!(
                    "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\nusers:\n- name: {user}\n  user:\n    token: {user}-token\ncontexts:\n- name: test\n  context: {{cluster: test, user: {user}}}\ncurrent-context: test\n",
                    ca = d.join("ca.crt").display()
                ),
            )
            .unwrap();
        }
        let mut cp = ControlPlane {
            dir,
            url,
            bin,
            etcd: None,
            apiserver: None,
            controllers: None,
            port,
            etcd_port: free_port(),
        };
        cp.start_etcd();
        cp.start_apiserver();
        let d = cp.dir.path().to_owned();
        cp.controllers = Some(spawn(
            &cp.bin,
            "kube-controller-manager",
            &[
                format!("--kubeconfig={}", d.join("admin.kubeconfig").display()),
                "--controllers=disruption-controller,garbage-collector-controller".into(),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                "--secure-port=0".into(),
            ],
            &d.join("kube-controller-manager.log"),
        ));
        cp
    }

    fn start_etcd(&mut self) {
        let d = self.dir.path();
        let peer = free_port();
        let client = format!("http://127.0.0.1:{}", self.etcd_port);
        let peer_url = format!("http://127.0.0.1:{peer}");
        self.etcd = Some(spawn(
            &self.bin,
            "etcd",
            &[
                format!("--data-dir={}", d.join("etcd").display()),
                format!("--listen-client-urls={client}"),
                format!("--advertise-client-urls={client}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=default={peer_url}"),
                "--log-level=warn".into(),
                "--unsafe-no-fsync".into(),
            ],
            &d.join("etcd.log"),
        ));
    }

    fn start_apiserver(&mut self) {
        let d = self.dir.path();
        let p = |name: &str| d.join(name).display().to_string();
        self.apiserver = Some(spawn(
            &self.bin,
            "kube-apiserver",
            &[
                format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_port),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={}", self.port),
                format!("--tls-cert-file={}", p("server.crt")),
                format!("--tls-private-key-file={}", p("server.key")),
                format!("--client-ca-file={}", p("ca.crt")),
                format!("--token-auth-file={}", p("tokens.csv")),
                "--authorization-mode=RBAC".into(),
                "--service-account-issuer=https://kubernetes.default.svc".into(),
                format!("--service-account-key-file={}", p("sa.pub")),
                format!("--service-account-signing-key-file={}", p("sa.key")),
                "--service-cluster-ip-range=10.96.0.0/24".into(),
                "--enable-priority-and-fairness=false".into(),
                // No service-account controller runs (nor any kubelet that
                // would mount tokens): pods need no "default" account.
                "--disable-admission-plugins=ServiceAccount".into(),
                format!("--cert-dir={}", p("certs")),
            ],
            &d.join("kube-apiserver.log"),
        ));
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ok = Command::new("curl")
                .args(["-sf", "--cacert"])
                .arg(self.dir.path().join("ca.crt"))
                .args(["-H", "Authorization: Bearer admin-token"])
                .arg(format!("{}/readyz", self.url))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("cannot run curl: install it (cargo xtask test does, as root)")
                .success();
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver was not ready in 120 s:\n{}",
                self.log("kube-apiserver")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops the API server and starts it again (etcd keeps the objects):
    /// every watch breaks.
    pub fn restart_apiserver(&mut self, down_for: Duration) {
        if let Some(mut c) = self.apiserver.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
        std::thread::sleep(down_for);
        self.start_apiserver();
    }

    /// The kubeconfig of one of [`USERS`].
    pub fn kubeconfig(&self, user: &str) -> PathBuf {
        self.dir.path().join(format!("{user}.kubeconfig"))
    }

    pub fn log(&self, name: &str) -> String {
        let text =
            fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// A client as `user`.
    pub async fn client(&self, user: &str) -> kube::Client {
        let kc = Kubeconfig::read_from(self.kubeconfig(user)).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .unwrap();
        kube::Client::try_from(config).unwrap()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for child in [&mut self.controllers, &mut self.apiserver, &mut self.etcd]
            .into_iter()
            .flatten()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What the kubelets of the tests' nodes would do, simulated: Node objects
/// with a Ready condition flipped by the test (a "reboot" is NotReady then
/// Ready), pods marked Ready, and evicted pods removed as a kubelet
/// removes a terminated pod.
#[derive(Clone)]
#[allow(missing_debug_implementations)]
pub struct Kubelet {
    pub nodes: Api<Node>,
    pub client: kube::Client,
}

impl Kubelet {
    pub fn new(client: kube::Client) -> Kubelet {
        Kubelet {
            nodes: Api::all(client.clone()),
            client,
        }
    }

    /// Creates a Ready node with `labels`.
    pub async fn create_node(&self, name: &str, labels: serde_json::Value) -> Node {
        let node: Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels},
        }))
        .unwrap();
        let node = self
            .nodes
            .create(&PostParams::default(), &node)
            .await
            .unwrap();
        self.set_ready(name, true).await;
        node
    }

    /// Sets the node's Ready condition, as its kubelet would.
    pub async fn set_ready(&self, name: &str, ready: bool) {
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let patch = serde_json::json!({"status": {"conditions": [{
            "type": "Ready", "status": if ready { "True" } else { "False" },
            "reason": if ready { "KubeletReady" } else { "KubeletNotReady" },
            "message": "set by the tests' simulated kubelet",
            "lastHeartbeatTime": now, "lastTransitionTime": now,
        }]}});
        self.nodes
            .patch_status(name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
            .unwrap();
    }

    /// Creates a running, Ready pod bound to `node`.
    pub async fn create_pod(&self, ns: &str, name: &str, node: &str, labels: serde_json::Value) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "registry.invalid/none"}]},
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let status = serde_json::json!({"status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
        ]}});
        pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap();
    }

    /// Removes the pods that an eviction marked for deletion, as their
    /// kubelet would once they stopped. Returns how many.
    pub async fn reap_terminating(&self) -> usize {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let mut n = 0;
        for p in pods.list(&ListParams::default()).await.unwrap() {
            if p.metadata.deletion_timestamp.is_some() {
                let ns = p.metadata.namespace.clone().unwrap_or_default();
                let name = p.metadata.name.clone().unwrap_or_default();
                let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
                let _ = api
                    .delete(&name, &DeleteParams::default().grace_period(0))
                    .await;
                n += 1;
            }
        }
        n
    }
}

/// Creates the ClusterRoles and Roles of a manifest in `deploy/` and binds
/// each to `group` (a test user's group, standing for the ServiceAccount
/// the manifest binds), so that a test runs with exactly the shipped
/// rights. Namespaces in the manifest are created too.
pub async fn grant_roles(admin: &kube::Client, manifest: &Path, group: &str) -> Vec<String> {
    use k8s_openapi::api::core::v1::Namespace;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    let text = fs::read_to_string(manifest).unwrap();
    let mut names = Vec::new();
    let subject = serde_json::json!([{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": group}]);
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let yaml = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).unwrap();
        let value = serde_json::to_value(yaml).unwrap();
        let name = value["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match value["kind"].as_str() {
            Some("Namespace") => {
                let api: Api<Namespace> = Api::all(admin.clone());
                let ns: Namespace = serde_json::from_value(value).unwrap();
                let _ = api.create(&PostParams::default(), &ns).await;
            }
            Some("ClusterRole") => {
                let role: ClusterRole = serde_json::from_value(value).unwrap();
                Api::<ClusterRole>::all(admin.clone())
                    .create(&PostParams::default(), &role)
                    .await
                    .unwrap();
                let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": format!("{name}-test")},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
                    "subjects": subject,
                }))
                .unwrap();
                Api::<ClusterRoleBinding>::all(admin.clone())
                    .create(&PostParams::default(), &binding)
                    .await
                    .unwrap();
                names.push(name);
            }
            Some("Role") => {
                let ns = value["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default")
                    .to_owned();
                let role: Role = serde_json::from_value(value).unwrap();
                Api::<Role>::namespaced(admin.clone(), &ns)
                    .create(&PostParams::default(), &role)
                    .await
                    .unwrap();
                let binding: RoleBinding = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": format!("{name}-test")},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                    "subjects": subject,
                }))
                .unwrap();
                Api::<RoleBinding>::namespaced(admin.clone(), &ns)
                    .create(&PostParams::default(), &binding)
                    .await
                    .unwrap();
                names.push(name);
            }
            _ => {}
        }
    }
    names
}

/// Creates the CRDs of a manifest and waits until they are established.
pub async fn install_crds(admin: &kube::Client, manifest: &Path) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let api: Api<CustomResourceDefinition> = Api::all(admin.clone());
    let text = fs::read_to_string(manifest).unwrap();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let yaml = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).unwrap();
        let crd: CustomResourceDefinition = serde_yaml::from_value(yaml).unwrap();
        let name = crd.metadata.name.clone().unwrap();
        api.create(&PostParams::default(), &crd).await.unwrap();
        eventually(
            &format!("CRD {name} established"),
            Duration::from_secs(30),
            || {
                let api = api.clone();
                let name = name.clone();
                async move {
                    let c = api.get(&name).await.ok()?;
                    c.status?
                        .conditions?
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                        .then_some(())
                }
            },
        )
        .await;
    }
}

/// The repository's root (for `deploy/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Waits until `f` gives `Some`, polling every 100 ms, up to `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A workspace binary, beside the test executable in the target folder.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    // A test runs from target/PROFILE/deps, a binary from target/PROFILE.
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap()
    } else {
        dir
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it first (`cargo build --bins`; cargo xtask test does)",
        path.display()
    );
    path
}

/// A process started by a test; killed when dropped.
#[derive(Debug)]
pub struct Process {
    child: Option<Child>,
}

impl Process {
    pub fn spawn(command: &mut Command, log: &Path) -> Process {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        Process { child: Some(child) }
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// tandem-agent for `node`, on the bus at `bus`, as the `tandem-agent` user.
pub fn start_agent(cp: &ControlPlane, node: &str, bus: &str, log: &Path) -> Process {
    Process::spawn(
        Command::new(workspace_bin("tandem-agent"))
            .args(["--node", node, "--poll-seconds", "1"])
            .env("KUBECONFIG", cp.kubeconfig("tandem-agent"))
            .env("DBUS_SYSTEM_BUS_ADDRESS", bus),
        log,
    )
}

/// tandem-operator as the `tandem-operator` user, deciding every 300 ms,
/// with a 5 s lease; its metrics on 127.0.0.1:`metrics_port`.
pub fn start_operator(cp: &ControlPlane, identity: &str, metrics_port: u16) -> Process {
    Process::spawn(
        Command::new(workspace_bin("tandem-operator"))
            .args(["run", "--interval-ms", "300", "--lease-seconds", "5"])
            .arg(format!("--metrics-addr=127.0.0.1:{metrics_port}"))
            .arg(format!("--identity={identity}"))
            .env("KUBECONFIG", cp.kubeconfig("tandem-operator"))
            .env("POD_NAMESPACE", "tandem-system"),
        &cp.dir.path().join("operator.log"),
    )
}
