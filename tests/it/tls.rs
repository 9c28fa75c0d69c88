//! TLS to PostgreSQL: `sslmode` and `sslrootcert` reach both the pool and the listener.
//!
//! The local server serves Debian's snakeoil certificate, which no root vouches for: enough
//! for `require` (encrypted, unverified) and to see `verify-full` refuse it. To see
//! `verify-full` succeed, one test makes its own CA and server certificate with rcgen and has
//! the server serve them for a while (ALTER SYSTEM and a reload, restored by a guard). That
//! needs root (to give the key to the `postgres` user) and the server on this machine;
//! without them it is skipped with the reason printed, unless `CI` is set, where it fails.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use milo_workers::daemon::{self, Daemon, Options};
use milo_workers::db;
use milo_workers::platform::SimulatedPlatform;
use milo_workers::util::ErrorChain;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use tokio_postgres::Client;

use crate::common::{self, eventually, TestDb};

/// Serializes the tests that change the server's certificate, across processes too.
const SERVER_CERT_LOCK: i64 = 0x6d69_6c6f_746c_7301;
/// Where the server-certificate test puts its files; the `postgres` user must read them.
const SERVER_CERT_DIR: &str = "/var/lib/postgresql/milo-workers-tls-test";

/// `(application_name, ssl)` of the daemon's sessions on the database.
async fn daemon_sessions(admin: &Client, database: &str) -> Vec<(String, bool)> {
    admin
        .query(
            "SELECT a.application_name, s.ssl
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.datname = $1 AND a.application_name IN ($2, $3)
             ORDER BY 1",
            &[
                &database,
                &db::POOL_APPLICATION_NAME,
                &db::LISTENER_APPLICATION_NAME,
            ],
        )
        .await
        .expect("pg_stat_ssl")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Starts the daemon on `url`, waits for its listener, and runs one sweep so that the pool
/// holds a connection.
async fn start_on(url: &str) -> Daemon {
    let platform = SimulatedPlatform::new(std::time::Duration::ZERO, 0.0);
    let mut options = Options::new(url, common::settings(), Arc::new(platform));
    options.migrate = false;
    let daemon = daemon::start(options).await.expect("daemon starts");
    let listener = daemon.listener.clone();
    eventually("the listener subscribes", || {
        let listener = listener.clone();
        async move { listener.is_connected() }
    })
    .await;
    daemon.run_slot_recovery_now().await.expect("a sweep runs");
    daemon
}

/// Whether the connection of `client` is encrypted, by the server's account.
async fn encrypted(client: &Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0)
}

/// Connects through `db::connect_config`, as the daemon does; the error as a full chain.
async fn try_connect(url: &str) -> Result<Client, String> {
    let settings =
        db::connect_config(url, "milo-workers-tls-test").map_err(|e| ErrorChain(&e).to_string())?;
    let (client, connection) = settings
        .connect()
        .await
        .map_err(|e| ErrorChain(&e).to_string())?;
    tokio::spawn(connection);
    Ok(client)
}

#[tokio::test]
async fn require_encrypts_the_listener_and_the_pool() {
    let db = TestDb::new().await;
    let admin = common::connect(&common::server_url()).await;
    let daemon = start_on(&common::with_param(&db.url, "sslmode", "require")).await;

    let sessions = daemon_sessions(&admin, &db.name).await;
    let names: Vec<&str> = sessions.iter().map(|(name, _)| name.as_str()).collect();
    assert!(names.contains(&db::POOL_APPLICATION_NAME), "{sessions:?}");
    assert!(
        names.contains(&db::LISTENER_APPLICATION_NAME),
        "{sessions:?}"
    );
    assert!(sessions.iter().all(|(_, ssl)| *ssl), "{sessions:?}");
    assert!(daemon.stop().await);
}

#[tokio::test]
async fn disable_stays_plaintext_and_prefer_is_the_encrypted_default() {
    let db = TestDb::new().await;
    let admin = common::connect(&common::server_url()).await;
    let daemon = start_on(&common::with_param(&db.url, "sslmode", "disable")).await;
    let sessions = daemon_sessions(&admin, &db.name).await;
    assert!(sessions.len() >= 2, "{sessions:?}");
    assert!(sessions.iter().all(|(_, ssl)| !*ssl), "{sessions:?}");
    assert!(daemon.stop().await);

    // No sslmode at all is `prefer`: this server offers TLS, so it is used.
    let client = try_connect(&db.url).await.expect("connects");
    assert!(encrypted(&client).await);
    let explicit = common::with_param(&db.url, "sslmode", "prefer");
    assert!(encrypted(&try_connect(&explicit).await.expect("connects")).await);
}

/// A CA made for the test: its certificate (PEM) and key.
struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl TestCa {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("CA certificate");
        Self { cert, key }
    }

    /// A server certificate for `names` (host names or IP addresses): PEM cert and key.
    fn issue(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().expect("server key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "milo-workers test server");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("server certificate");
        (cert.pem(), key.serialize_pem())
    }

    /// Writes the CA certificate to a fresh file and returns its path.
    fn write_root(&self, dir: &Path) -> PathBuf {
        let path = dir.join(format!(
            "milo-workers-test-root-{}-{}.pem",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::write(&path, self.cert.pem()).expect("write root certificate");
        path
    }
}

#[tokio::test]
async fn verify_full_refuses_a_server_certificate_not_signed_by_the_root() {
    let db = TestDb::new().await;
    // Whatever the server serves (snakeoil, or another test's certificate), this brand-new CA
    // signed none of it.
    let ca = TestCa::new("milo-workers unrelated test CA");
    let root = ca.write_root(&std::env::temp_dir());
    let root_text = root.to_str().expect("utf-8 path").to_owned();

    for mode in ["verify-full", "verify-ca"] {
        let url = common::with_param(&db.url, "sslmode", mode);
        let url = common::with_param(&url, "sslrootcert", &root_text);
        let error = try_connect(&url).await.expect_err("refused");
        assert!(
            error.contains("invalid peer certificate") && error.contains("UnknownIssuer"),
            "{mode}: {error}"
        );
        // The pool reports it the same way.
        let pool = daemon::pool(&url, &common::settings()).expect("pool");
        let error = pool.get().await.expect_err("refused");
        assert!(
            ErrorChain(&error)
                .to_string()
                .contains("invalid peer certificate"),
            "{mode}: {}",
            ErrorChain(&error)
        );
    }
    // Without sslrootcert the public roots are used, and they do not vouch for it either.
    let url = common::with_param(&db.url, "sslmode", "verify-full");
    let error = try_connect(&url).await.expect_err("refused");
    assert!(error.contains("invalid peer certificate"), "{error}");
    // `require` encrypts without checking.
    let url = common::with_param(&db.url, "sslmode", "require");
    assert!(encrypted(&try_connect(&url).await.expect("connects")).await);
    std::fs::remove_file(&root).expect("remove root");
}

#[tokio::test]
async fn verify_full_trusts_a_private_ca_given_as_sslrootcert() {
    let db = TestDb::new().await;
    let Some(served) = ServedCertificate::install().await else {
        return;
    };
    let root_text = served.root.to_str().expect("utf-8 path").to_owned();

    // The daemon, both pool and listener, verifying chain and host name (127.0.0.1 or
    // localhost, both in the certificate).
    let url = common::with_param(&db.url, "sslmode", "verify-full");
    let url = common::with_param(&url, "sslrootcert", &root_text);
    let admin = common::connect(&common::server_url()).await;
    let daemon = start_on(&url).await;
    let sessions = daemon_sessions(&admin, &db.name).await;
    assert!(sessions.len() >= 2, "{sessions:?}");
    assert!(sessions.iter().all(|(_, ssl)| *ssl), "{sessions:?}");
    assert!(daemon.stop().await);

    // Reached under a name the certificate does not carry: verify-full refuses, verify-ca
    // (chain only) accepts, as in libpq.
    let server: tokio_postgres::Config = common::server_url().parse().expect("server url");
    let port = server.get_ports().first().copied().unwrap_or(5432);
    let user = server.get_user().unwrap_or("postgres");
    let other_name = |mode: &str| {
        format!(
            "host=milo-db.invalid hostaddr=127.0.0.1 port={port} user={user} dbname={} \
             sslmode={mode} sslrootcert='{root_text}'",
            db.name
        )
    };
    let error = try_connect(&other_name("verify-full"))
        .await
        .expect_err("refused");
    assert!(error.contains("not valid for name"), "{error}");
    let client = try_connect(&other_name("verify-ca"))
        .await
        .expect("verify-ca");
    assert!(encrypted(&client).await);

    served.restore().await;
}

/// The server serving a certificate of a CA made here, until [`Self::restore`] (or drop).
struct ServedCertificate {
    /// Holds the advisory lock that keeps other runs from changing the certificate meanwhile.
    _lock: Client,
    root: PathBuf,
    previous: Vec<(&'static str, Option<String>)>,
    restored: bool,
}

const SSL_FILES: [&str; 2] = ["ssl_cert_file", "ssl_key_file"];

impl ServedCertificate {
    /// `None` (with the reason printed) where this cannot be done, unless `CI` is set.
    async fn install() -> Option<Self> {
        let admin = common::connect(&common::server_url()).await;
        if let Err(reason) = Self::can_install(&admin).await {
            if std::env::var_os("CI").is_some() {
                panic!("cannot run the server-certificate test in CI: {reason}");
            }
            eprintln!("SKIPPED verify_full_trusts_a_private_ca_given_as_sslrootcert: {reason}");
            return None;
        }
        admin
            .execute("SELECT pg_advisory_lock($1)", &[&SERVER_CERT_LOCK])
            .await
            .expect("advisory lock");

        let mut previous = Vec::new();
        for name in SSL_FILES {
            let row = admin
                .query_one(
                    "SELECT setting, coalesce(sourcefile, '') LIKE '%postgresql.auto.conf'
                     FROM pg_settings WHERE name = $1",
                    &[&name],
                )
                .await
                .expect("pg_settings");
            let (setting, from_alter_system): (String, bool) = (row.get(0), row.get(1));
            // A value set by ALTER SYSTEM is put back; anything else (or a leftover of a run
            // that was killed) by RESET.
            let keep = from_alter_system && !setting.starts_with(SERVER_CERT_DIR);
            previous.push((name, keep.then_some(setting)));
        }

        let ca = TestCa::new("milo-workers test CA");
        let (cert, key) = ca.issue(&["127.0.0.1", "localhost"]);
        let dir = Path::new(SERVER_CERT_DIR);
        let owner = std::fs::metadata("/var/lib/postgresql").expect("postgres home");
        let (uid, gid) = (owner.uid(), owner.gid());
        std::fs::create_dir_all(dir).expect("certificate directory");
        std::os::unix::fs::chown(dir, Some(uid), Some(gid)).expect("chown directory");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        for (file, text, mode) in [("server.crt", &cert, 0o644), ("server.key", &key, 0o600)] {
            let path = dir.join(file);
            std::fs::write(&path, text).expect("write certificate file");
            std::os::unix::fs::chown(&path, Some(uid), Some(gid)).expect("chown");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        }
        let root = ca.write_root(&std::env::temp_dir());

        let served = Self {
            _lock: admin,
            root,
            previous,
            restored: false,
        };
        let cert_path = dir.join("server.crt").display().to_string();
        let key_path = dir.join("server.key").display().to_string();
        set_ssl_files(&[
            ("ssl_cert_file", Some(cert_path)),
            ("ssl_key_file", Some(key_path)),
        ])
        .await;
        Some(served)
    }

    /// Why the certificate cannot be installed here, if it cannot.
    async fn can_install(admin: &Client) -> Result<(), String> {
        let row = admin
            .query_one(
                "SELECT rolsuper, current_setting('data_directory')
                 FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .map_err(|e| format!("cannot query the server: {e}"))?;
        let (superuser, data_directory): (bool, String) = (row.get(0), row.get(1));
        if !superuser {
            return Err("the test's database user is not a superuser (ALTER SYSTEM)".into());
        }
        if !Path::new(&data_directory).exists() {
            return Err(format!(
                "the server's data directory {data_directory} is not on this machine"
            ));
        }
        // Only root can give the key file to the postgres user, as the server demands.
        let probe = Path::new("/var/lib/postgresql")
            .join(format!(".milo-workers-probe-{}", std::process::id()));
        let owner = std::fs::metadata("/var/lib/postgresql")
            .map_err(|e| format!("no /var/lib/postgresql: {e}"))?;
        std::fs::write(&probe, "")
            .map_err(|e| format!("cannot write under /var/lib/postgresql: {e}"))?;
        let given = std::os::unix::fs::chown(&probe, Some(owner.uid()), Some(owner.gid()));
        let _ = std::fs::remove_file(&probe);
        given.map_err(|e| format!("cannot give a file to the postgres user (not root?): {e}"))
    }

    async fn restore(mut self) {
        set_ssl_files(&self.previous).await;
        self.forget_files();
        self.restored = true;
    }

    fn forget_files(&self) {
        let _ = std::fs::remove_dir_all(SERVER_CERT_DIR);
        let _ = std::fs::remove_file(&self.root);
    }
}

impl Drop for ServedCertificate {
    fn drop(&mut self) {
        if self.restored {
            return;
        }
        // A failed test: restore from a runtime of its own, as async drop does not exist.
        let previous = self.previous.clone();
        let restored = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(set_ssl_files(&previous))
        })
        .join();
        if restored.is_err() {
            eprintln!("COULD NOT RESTORE the server's ssl_cert_file/ssl_key_file");
        }
        self.forget_files();
    }
}

/// `ALTER SYSTEM SET` (or `RESET` for `None`) and reload, then waits until new sessions see it.
async fn set_ssl_files(values: &[(&'static str, Option<String>)]) {
    let admin = common::connect(&common::server_url()).await;
    for (name, value) in values {
        let statement = match value {
            Some(value) => format!("ALTER SYSTEM SET {name} = '{}'", value.replace('\'', "''")),
            None => format!("ALTER SYSTEM RESET {name}"),
        };
        admin.batch_execute(&statement).await.expect("ALTER SYSTEM");
    }
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .expect("reload");
    let wanted: Vec<(&str, Option<String>)> = values.to_vec();
    eventually("new sessions see the changed certificate settings", || {
        let wanted = wanted.clone();
        async move {
            let fresh = common::connect(&common::server_url()).await;
            for (name, value) in wanted {
                let row = fresh
                    .query_one(
                        "SELECT setting, boot_val FROM pg_settings WHERE name = $1",
                        &[&name],
                    )
                    .await
                    .expect("pg_settings");
                let (setting, boot): (String, String) = (row.get(0), row.get(1));
                let matches = match &value {
                    Some(value) => &setting == value,
                    // Reset: back to the configuration file's value, which is not ours.
                    None => !setting.starts_with(SERVER_CERT_DIR) || setting == boot,
                };
                if !matches {
                    return false;
                }
            }
            true
        }
    })
    .await;
}
