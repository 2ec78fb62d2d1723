"""Workernator's unprivileged side: the gRPC/mTLS api server, the CLI and certificate tooling.

TLS 1.3 only (design section 8): grpcio has no setting for the minimum TLS version, but it reads
``GRPC_SSL_CIPHER_SUITES`` once, when grpc starts. Listing only RSA-authenticated TLS 1.2 suites
means no TLS 1.2 handshake can succeed with our ECDSA keys, while TLS 1.3 suites are unaffected.
It is set here, in the package, so it happens before any module of ours imports grpc. The server
also refuses any call whose connection is not TLS 1.3, in case this ever stops holding.

Importing the package also makes an uncaught Ctrl-C (``KeyboardInterrupt``) exit 130 without a
traceback (:mod:`workernator_api.interrupt`): here, so that it holds from the first moment the
CLI's own code runs, while its slow imports load.
"""

import os

from workernator_api import interrupt as _interrupt  # noqa: F401 - installs the excepthook

TLS12_SUITES_NO_ECDSA = "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384"
os.environ["GRPC_SSL_CIPHER_SUITES"] = TLS12_SUITES_NO_ECDSA
