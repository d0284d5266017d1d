"""Taking a job to a cluster: connecting to Ray (cluster), Ray's job server (submit) and
KubeRay manifests (k8s)."""
