//! Test data for the benchmarks: Kubernetes-like objects from a deterministic generator, written into etcd.

use anyhow::Result;
use etcd_client::{Client, TxnOp};

/// Bytes of random base64 the dense fill adds to each object (zstd about 4–5×).
pub const DENSE_BLOB: usize = 700;
/// Bytes of random base64 that make the data about half compressible (zstd about 2×): as many random bytes as
/// the rest of an average object, which alone compresses about 10×.
pub const HALF_BLOB: usize = 3000;

/// Kubernetes-like objects from a fixed seed: JSON with repeated field names, names, labels, uids, image
/// digests and a share of base64 secret data — compressible like real clusters, not zeros, not noise.
/// A `blob` above 0 adds an annotation of that many bytes of random base64 to every object (a cluster heavy in
/// certificates, tokens and last-applied blobs): 700 bytes ([`DENSE_BLOB`]) bring zstd's ratio down to about
/// 4–5×, [`HALF_BLOB`] to about 2×.
pub struct Gen {
    state: u64,
    blob: usize,
}

impl Gen {
    /// A generator from `seed` adding `blob` bytes of random base64 to each object.
    pub fn new(seed: u64, blob: usize) -> Self {
        Self { state: seed, blob }
    }

    fn next(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }
    fn hex(&mut self, n: usize) -> String {
        let mut s = String::with_capacity(n);
        while s.len() < n {
            s.push_str(&format!("{:016x}", self.next()));
        }
        s.truncate(n);
        s
    }
    fn b64(&mut self, n: usize) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        (0..n).map(|_| A[(self.next() % 64) as usize] as char).collect()
    }
    /// Object `i`: its key and its JSON value.
    pub fn object(&mut self, i: u64) -> (String, String) {
        let (key, mut v) = self.kind_object(i);
        if self.blob > 0 {
            // Before the closing brace of the object: an opaque annotation-like blob.
            v.pop();
            let blob = self.b64(self.blob);
            v.push_str(&format!(r#","x-opaque":"{blob}"}}"#));
        }
        (key, v)
    }

    fn kind_object(&mut self, i: u64) -> (String, String) {
        let ns = format!("team-{}", i % 40);
        let app = format!("svc-{}", (i / 7) % 300);
        match i % 10 {
            0 => {
                let key = format!("/registry/secrets/{ns}/{app}-tls-{i}");
                let v = format!(
                    r#"{{"kind":"Secret","apiVersion":"v1","metadata":{{"name":"{app}-tls-{i}","namespace":"{ns}","uid":"{}","resourceVersion":"{}","creationTimestamp":"2026-0{}-1{}T0{}:1{}:00Z","labels":{{"app":"{app}"}}}},"type":"kubernetes.io/tls","data":{{"tls.crt":"{}","tls.key":"{}"}}}}"#,
                    self.hex(32),
                    i,
                    1 + i % 9,
                    i % 10,
                    i % 10,
                    i % 6,
                    self.b64(1400),
                    self.b64(900)
                );
                (key, v)
            }
            1 | 2 => {
                let key = format!("/registry/configmaps/{ns}/{app}-config-{i}");
                let mut data = String::new();
                for k in 0..12 {
                    data.push_str(&format!(
                        r#""setting_{k}.yaml":"server:\n  port: {}\n  host: {app}.{ns}.svc.cluster.local\n  timeout: {}s\n  replicas: {}\nfeatures:\n  flag_{k}: true\n","#,
                        8000 + self.next() % 1000, self.next() % 120, self.next() % 9
                    ));
                }
                data.pop();
                let v = format!(
                    r#"{{"kind":"ConfigMap","apiVersion":"v1","metadata":{{"name":"{app}-config-{i}","namespace":"{ns}","uid":"{}","resourceVersion":"{i}","labels":{{"app":"{app}","tier":"backend"}}}},"data":{{{data}}}}}"#,
                    self.hex(32)
                );
                (key, v)
            }
            _ => {
                let key = format!("/registry/pods/{ns}/{app}-{}-{}", self.hex(10), self.hex(5));
                let mut env = String::new();
                for k in 0..14 {
                    env.push_str(&format!(
                        r#"{{"name":"ENV_{k}_{}","value":"{}"}},"#,
                        app.to_uppercase(),
                        self.hex(20)
                    ));
                }
                env.pop();
                let v = format!(
                    r#"{{"kind":"Pod","apiVersion":"v1","metadata":{{"name":"{app}-{i}","generateName":"{app}-","namespace":"{ns}","uid":"{}","resourceVersion":"{i}","creationTimestamp":"2026-11-0{}T1{}:2{}:3{}Z","labels":{{"app":"{app}","pod-template-hash":"{}","team":"{ns}"}},"ownerReferences":[{{"apiVersion":"apps/v1","kind":"ReplicaSet","name":"{app}-{}","uid":"{}","controller":true,"blockOwnerDeletion":true}}],"managedFields":[{{"manager":"kube-controller-manager","operation":"Update","apiVersion":"v1","time":"2026-11-01T10:00:00Z","fieldsType":"FieldsV1","fieldsV1":{{"f:metadata":{{"f:generateName":{{}},"f:labels":{{".":{{}},"f:app":{{}},"f:pod-template-hash":{{}}}},"f:ownerReferences":{{}}}},"f:spec":{{"f:containers":{{}},"f:dnsPolicy":{{}},"f:restartPolicy":{{}},"f:schedulerName":{{}}}}}}}}]}},"spec":{{"containers":[{{"name":"{app}","image":"registry.example.com/{ns}/{app}@sha256:{}","ports":[{{"containerPort":{},"protocol":"TCP"}}],"env":[{env}],"resources":{{"limits":{{"cpu":"{}m","memory":"{}Mi"}},"requests":{{"cpu":"{}m","memory":"{}Mi"}}}},"volumeMounts":[{{"name":"kube-api-access-{}","readOnly":true,"mountPath":"/var/run/secrets/kubernetes.io/serviceaccount"}}],"terminationMessagePath":"/dev/termination-log","imagePullPolicy":"IfNotPresent"}}],"restartPolicy":"Always","terminationGracePeriodSeconds":30,"dnsPolicy":"ClusterFirst","serviceAccountName":"default","nodeName":"node-{}","schedulerName":"default-scheduler"}},"status":{{"phase":"Running","conditions":[{{"type":"Ready","status":"True","lastTransitionTime":"2026-11-01T10:00:0{}Z"}},{{"type":"ContainersReady","status":"True"}},{{"type":"PodScheduled","status":"True"}}],"hostIP":"10.0.{}.{}","podIP":"10.244.{}.{}","containerStatuses":[{{"name":"{app}","ready":true,"restartCount":{},"image":"registry.example.com/{ns}/{app}:v1.{}","imageID":"registry.example.com/{ns}/{app}@sha256:{}","containerID":"containerd://{}","started":true}}]}}}}"#,
                    self.hex(32),
                    i % 9,
                    i % 10,
                    i % 6,
                    i % 10,
                    self.hex(10),
                    self.hex(10),
                    self.hex(32),
                    self.hex(64),
                    8000 + i % 100,
                    100 + i % 900,
                    128 + i % 1024,
                    50 + i % 200,
                    64 + i % 512,
                    self.hex(5),
                    i % 60,
                    i % 10,
                    i % 250,
                    i % 250,
                    i % 250,
                    i % 250,
                    i % 5,
                    i % 40,
                    self.hex(64),
                    self.hex(64)
                );
                (key, v)
            }
        }
    }
}

/// What [`fill`] wrote.
#[derive(Debug, Clone, Copy, Default)]
pub struct Filled {
    /// Bytes of keys and values.
    pub written: u64,
    pub keys: u64,
    /// The `first` of a further fill that adds new keys rather than overwriting these.
    pub next: u64,
}

/// Writes at least `bytes` of objects (see [`Gen`]) with 8 concurrent writers, 64 puts per transaction,
/// numbered from `first`.
pub async fn fill(endpoint: &str, bytes: u64, blob: usize, first: u64) -> Result<Filled> {
    let mut tasks = Vec::new();
    let per_task = bytes / 8;
    for t in 0..8u64 {
        let endpoint = endpoint.to_string();
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect([endpoint], None).await?;
            // `first` 0 keeps the objects of the first fill what they always were.
            let mut g = Gen::new(0x9E37_79B9_7F4A_7C15 ^ (t + 1) ^ first.rotate_left(32), blob);
            let (mut written, mut keys, mut i) = (0u64, 0u64, first + t);
            while written < per_task {
                let mut ops = Vec::with_capacity(64);
                for _ in 0..64 {
                    let (k, v) = g.object(i);
                    written += (k.len() + v.len()) as u64;
                    ops.push(TxnOp::put(k, v, None));
                    i += 8;
                    keys += 1;
                }
                client.txn(etcd_client::Txn::new().and_then(ops)).await?;
            }
            anyhow::Ok((written, keys, i))
        }));
    }
    let mut total = Filled { next: first, ..Filled::default() };
    for t in tasks {
        let (w, k, i) = t.await??;
        total.written += w;
        total.keys += k;
        total.next = total.next.max(i + 8);
    }
    Ok(total)
}
