"""The Kubernetes sidecar injector: a mutating admission webhook that adds Ringside to pods.

`options` reads the pod's annotations over the injector's defaults, `patch` turns a Pod into a
JSON Patch (pure functions), `review` reads and answers AdmissionReview documents, `tls` keeps
the serving certificate current, `webhook` is the HTTPS server, `command` the CLI entry.
"""
