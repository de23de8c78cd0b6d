//! The Kubernetes manifests under deploy/ agree with the code: rendered with
//! `kubectl kustomize`, every role of the role table has a Deployment (with its Service,
//! ServiceAccount, PodDisruptionBudget and HorizontalPodAutoscaler) that runs `serve ROLE` on
//! the role's port, probes only routes the binary serves, sets only variables the binary
//! reads, runs hardened, and the network policies allow exactly the edges the role table
//! implies. (`deploy/validate`, run by .ci/run, checks the objects against the schemas.)

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    process::Command,
};

use bazaar::roles::{self, RoleKind, GATEWAY_ADMIN_OFFSET};
use clap::Args;
use serde::Deserialize;
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// Every object of the rendered local overlay (roles, data tier, policies).
fn render() -> Vec<Value> {
    render_dir("overlays/local")
}

/// The objects `kubectl kustomize deploy/<dir>` renders.
fn render_dir(dir: &str) -> Vec<Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(deploy_dir().join(dir))
        .output()
        .expect("this test needs kubectl (with kustomize) on PATH");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("utf-8");
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("a YAML object"))
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
}

/// The roles that are deployed: every role `up` starts (the payment simulator is a tool).
fn deployed() -> Vec<roles::Role> {
    roles::up_roles().collect()
}

/// The port each role listens on under the default base port (as docs/architecture.md lists them).
fn port(role: roles::Role) -> u64 {
    8080 + u64::from(role.port_offset)
}

/// Every `BAZAAR_*` variable the binary reads: its settings, the config file, and each
/// service's store URL.
fn variables_read() -> BTreeSet<String> {
    use bazaar::settings::{Global, Place, Process, RoleSettings};
    let command = [
        Global::augment_args,
        Place::augment_args,
        RoleSettings::augment_args,
        Process::augment_args,
    ]
    .iter()
    .fold(clap::Command::new("bazaar"), |command, group| group(command));
    let mut names: BTreeSet<String> = command
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect();
    names.insert("BAZAAR_CONFIG".into());
    names.extend(roles::services().map(|(_, s)| bazaar::settings::store_url_var(s.name)));
    names
}

#[test]
fn every_role_of_the_table_is_deployed_with_its_companions() {
    let objects = render();
    for role in deployed() {
        for kind in [
            "Deployment",
            "Service",
            "ServiceAccount",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
        ] {
            assert!(find(&objects, kind, role.name).is_some(), "no {kind} for {}", role.name);
        }
        let deployment = find(&objects, "Deployment", role.name).expect("deployment");
        assert!(
            deployment["spec"]["replicas"].as_u64() >= Some(2),
            "{} runs once",
            role.name
        );
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["args"], serde_json::json!(["serve", role.name]));
        let ports: Vec<u64> = container["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .filter_map(|p| p["containerPort"].as_u64())
            .collect();
        assert!(ports.contains(&port(role)), "{} listens on {}", role.name, port(role));
    }
    let names: BTreeSet<&str> = objects
        .iter()
        .filter(|o| o["kind"] == "Deployment" && o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "bazaar")
        .filter_map(|o| o["metadata"]["name"].as_str())
        .collect();
    let table: BTreeSet<&str> = deployed().iter().map(|r| r.name).collect();
    assert!(table.is_subset(&names), "{table:?} vs {names:?}");
}

#[test]
fn probes_use_routes_and_ports_the_binary_serves() {
    let objects = render();
    for role in deployed() {
        let deployment = find(&objects, "Deployment", role.name).expect("deployment");
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let named: HashMap<&str, u64> = container["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .filter_map(|p| Some((p["name"].as_str()?, p["containerPort"].as_u64()?)))
            .collect();
        // Services answer health on their API port; the gateway on its admin port, where
        // /health/ready is not served.
        let (health_port, served): (u64, &[&str]) = match role.kind {
            RoleKind::Gateway => (8080 + u64::from(GATEWAY_ADMIN_OFFSET), &["/health", "/health/live"]),
            _ => (port(role), &["/health", "/health/ready", "/health/live"]),
        };
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            let get = &container[probe]["httpGet"];
            let path = get["path"]
                .as_str()
                .unwrap_or_else(|| panic!("{} {probe} path", role.name));
            assert!(served.contains(&path), "{} {probe} probes {path}", role.name);
            let port = match &get["port"] {
                Value::String(name) => named[name.as_str()],
                other => other.as_u64().expect("a port"),
            };
            assert_eq!(port, health_port, "{} {probe} port", role.name);
        }
    }
}

#[test]
fn every_variable_set_is_one_the_binary_reads() {
    let objects = render();
    let known = variables_read();
    for role in deployed() {
        let deployment = find(&objects, "Deployment", role.name).expect("deployment");
        let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .expect("env");
        for var in env {
            let name = var["name"].as_str().expect("name");
            assert!(
                known.contains(name),
                "{} sets {name}, which bazaar does not read",
                role.name
            );
        }
    }
}

#[test]
fn every_role_runs_unprivileged_on_a_read_only_root() {
    let objects = render();
    for role in deployed() {
        let pod = &find(&objects, "Deployment", role.name).expect("deployment")["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{}", role.name);
        assert_eq!(pod["automountServiceAccountToken"], false, "{}", role.name);
        let security = &pod["containers"][0]["securityContext"];
        assert_eq!(security["readOnlyRootFilesystem"], true, "{}", role.name);
        assert_eq!(security["allowPrivilegeEscalation"], false, "{}", role.name);
        assert_eq!(
            security["capabilities"]["drop"],
            serde_json::json!(["ALL"]),
            "{}",
            role.name
        );
        assert!(
            pod["containers"][0]["lifecycle"]["preStop"].is_object()
                && pod["terminationGracePeriodSeconds"].as_u64() >= Some(30),
            "{} drains before it stops",
            role.name
        );
    }
}

/// `(from, to, port)` of every pod-to-pod ingress rule between named apps.
fn ingress_edges(objects: &[Value]) -> BTreeSet<(String, String, u64)> {
    let mut edges = BTreeSet::new();
    for policy in objects.iter().filter(|o| o["kind"] == "NetworkPolicy") {
        let Some(to) = policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"].as_str() else {
            continue;
        };
        for rule in policy["spec"]["ingress"].as_array().into_iter().flatten() {
            let ports: Vec<u64> = rule["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["port"].as_u64())
                .collect();
            for peer in rule["from"].as_array().into_iter().flatten() {
                if let Some(from) = peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"].as_str() {
                    for port in &ports {
                        edges.insert((from.to_string(), to.to_string(), *port));
                    }
                }
            }
        }
    }
    edges
}

#[test]
fn network_policies_allow_exactly_the_edges_of_the_role_table() {
    let objects = render();
    assert!(find(&objects, "NetworkPolicy", "default-deny").is_some());
    // The gateway reaches every service's public port; every other service reaches users'
    // (for its JWKS); every service reaches the broker and the database server; the gateway
    // reaches Redis; JetStream nodes reach each other.
    let users = roles::RoleSpec::named(bazaar_users::SERVICE.name).expect("users is a role");
    let mut expected = BTreeSet::new();
    for (role, _) in roles::services() {
        expected.insert(("gateway".to_string(), role.name.to_string(), port(role)));
        if role.name != users.name {
            expected.insert((role.name.to_string(), users.name.to_string(), port(users)));
        }
        expected.insert((role.name.to_string(), "nats".to_string(), 4222));
        expected.insert((role.name.to_string(), "postgres".to_string(), 5432));
    }
    expected.insert(("gateway".to_string(), "redis".to_string(), 6379));
    expected.insert(("nats".to_string(), "nats".to_string(), 6222));
    assert_eq!(ingress_edges(&objects), expected);
}

/// The edges of the role table as a mesh policy sees them: (caller, callee, route), where the
/// route is `*` for every route. Clients reach the gateway from anywhere.
fn expected_mesh_edges() -> BTreeSet<(String, String, String)> {
    let users = roles::RoleSpec::named(bazaar_users::SERVICE.name).expect("users is a role");
    let mut edges = BTreeSet::new();
    edges.insert(("anyone".to_string(), "gateway".to_string(), "*".to_string()));
    for (role, _) in roles::services() {
        edges.insert(("gateway".to_string(), role.name.to_string(), "*".to_string()));
        if role.name != users.name {
            edges.insert((
                role.name.to_string(),
                users.name.to_string(),
                format!("GET {}", bazaar_kit::auth::JWKS_PATH),
            ));
        }
    }
    // The storefront's credential forms call users directly.
    for route in bazaar_web::CREDENTIAL_ROUTES {
        edges.insert((
            bazaar_web::SERVICE.name.to_string(),
            users.name.to_string(),
            route.to_string(),
        ));
    }
    edges
}

/// The name in a Kubernetes service account identity (Istio principal or Linkerd identity).
fn account(identity: &str) -> String {
    let identity = identity.strip_prefix("cluster.local/ns/bazaar/sa/").unwrap_or(identity);
    identity.split('.').next().unwrap_or(identity).to_string()
}

#[test]
fn the_istio_policies_allow_exactly_the_edges_of_the_role_table() {
    let objects = render_dir("mesh/istio");
    let peer = find(&objects, "PeerAuthentication", "default").expect("a PeerAuthentication");
    assert_eq!(peer["spec"]["mtls"]["mode"], "STRICT");
    let mut edges = BTreeSet::new();
    for policy in objects.iter().filter(|o| o["kind"] == "AuthorizationPolicy") {
        let Some(to) = policy["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"].as_str() else {
            assert_eq!(
                policy["spec"],
                serde_json::json!({}),
                "only allow-nothing selects every workload"
            );
            continue;
        };
        assert_eq!(policy["spec"]["action"], "ALLOW");
        for rule in policy["spec"]["rules"].as_array().expect("rules") {
            let route = match rule["to"][0]["operation"].as_object() {
                Some(op) => format!(
                    "{} {}",
                    op["methods"][0].as_str().unwrap(),
                    op["paths"][0].as_str().unwrap()
                ),
                None => "*".to_string(),
            };
            match rule["from"][0]["source"]["principals"].as_array() {
                Some(principals) => {
                    for principal in principals {
                        edges.insert((account(principal.as_str().unwrap()), to.to_string(), route.clone()));
                    }
                }
                None => {
                    edges.insert(("anyone".to_string(), to.to_string(), route));
                }
            }
        }
    }
    assert_eq!(edges, expected_mesh_edges());
}

#[test]
fn the_linkerd_policies_allow_exactly_the_edges_of_the_role_table() {
    let objects = render_dir("mesh/linkerd");
    let server_app = |name: &str| {
        find(&objects, "Server", name).expect("a Server")["spec"]["podSelector"]["matchLabels"]
            ["app.kubernetes.io/name"]
            .as_str()
            .expect("an app")
            .to_string()
    };
    let callers = |reference: &Value| -> Vec<String> {
        let name = reference["name"].as_str().unwrap();
        match reference["kind"].as_str().unwrap() {
            "NetworkAuthentication" => vec!["anyone".to_string()],
            kind => find(&objects, kind, name).expect("an authentication")["spec"]["identities"]
                .as_array()
                .expect("identities")
                .iter()
                .map(|i| account(i.as_str().unwrap()))
                .collect(),
        }
    };
    let mut edges = BTreeSet::new();
    for policy in objects.iter().filter(|o| o["kind"] == "AuthorizationPolicy") {
        let target = &policy["spec"]["targetRef"];
        let name = target["name"].as_str().unwrap();
        let (to, route) = match target["kind"].as_str().unwrap() {
            "Server" => (server_app(name), "*".to_string()),
            _ => {
                let route = find(&objects, "HTTPRoute", name).expect("an HTTPRoute");
                let matched = &route["spec"]["rules"][0]["matches"][0];
                let server = route["spec"]["parentRefs"][0]["name"].as_str().unwrap();
                let text = match (matched["path"]["type"].as_str(), matched["method"].as_str()) {
                    (Some("PathPrefix"), None) if matched["path"]["value"] == "/" => "*".to_string(),
                    (Some("Exact"), Some(method)) => format!("{method} {}", matched["path"]["value"].as_str().unwrap()),
                    other => panic!("a route bazaar does not use: {other:?}"),
                };
                (server_app(server), text)
            }
        };
        for reference in policy["spec"]["requiredAuthenticationRefs"].as_array().expect("refs") {
            for caller in callers(reference) {
                edges.insert((caller, to.clone(), route.clone()));
            }
        }
    }
    // The gateway may also call users' more specific routes (it may call all of users).
    let mut expected = expected_mesh_edges();
    let specific = bazaar_web::CREDENTIAL_ROUTES.map(str::to_string);
    for route in [format!("GET {}", bazaar_kit::auth::JWKS_PATH)]
        .into_iter()
        .chain(specific)
    {
        expected.insert(("gateway".to_string(), "users".to_string(), route));
    }
    assert_eq!(edges, expected);
}

/// The rows of the first table in the section of `docs/architecture.md` whose heading starts
/// with `heading`, each as its cells with backticks removed.
fn design_map_rows(heading: &str) -> Vec<Vec<String>> {
    let map = std::fs::read_to_string(deploy_dir().join("../docs/architecture.md")).expect("docs/architecture.md");
    let section = map
        .split("\n## ")
        .find(|s| s.starts_with(heading))
        .unwrap_or_else(|| panic!("docs/architecture.md has no section \"{heading}\""));
    section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|cell| cell.trim().replace('`', ""))
                .collect()
        })
        .collect()
}

#[test]
fn the_design_map_lists_every_role_at_its_port() {
    let listed: BTreeSet<(String, u64)> = design_map_rows("Roles")
        .into_iter()
        .map(|row| (row[0].clone(), row[2].parse().expect("a port")))
        .collect();
    let table: BTreeSet<(String, u64)> = roles::ROLES
        .iter()
        .map(|role| (role.name.to_string(), port(role)))
        .collect();
    assert_eq!(listed, table, "docs/architecture.md's roles against the role table");
}

#[test]
fn the_design_map_lists_the_topics_each_service_publishes_and_consumes() {
    let listed: BTreeSet<(String, String, String)> = design_map_rows("Edges")
        .into_iter()
        .filter(|row| row[1] == "broker")
        .flat_map(|row| {
            let topics: Vec<String> = row[3].split(',').map(|t| t.trim().to_string()).collect();
            topics.into_iter().map(move |t| (row[0].clone(), row[2].clone(), t))
        })
        .collect();
    let mut code = BTreeSet::new();
    for (role, spec) in roles::services() {
        for (how, topics) in [("publish", spec.publishes), ("consume", spec.consumes)] {
            code.extend(
                topics
                    .iter()
                    .map(|t| (role.name.to_string(), how.to_string(), t.to_string())),
            );
        }
    }
    assert_eq!(
        listed, code,
        "docs/architecture.md's broker edges against the services' specs"
    );
}

#[test]
fn every_documentation_page_is_linked_from_the_front_page() {
    let docs = deploy_dir().join("../docs");
    let front = std::fs::read_to_string(docs.join("../README.md")).expect("README.md");
    for page in std::fs::read_dir(&docs).expect("docs/") {
        let name = page.expect("a page").file_name().to_string_lossy().into_owned();
        if name.ends_with(".md") {
            assert!(
                front.contains(&format!("(docs/{name})")),
                "README.md links no docs/{name}"
            );
        }
    }
}
