"""STAND-IN for a vLLM server of DeepSeek-V4 on a model tree vLLM torch.compiles (the CPU
tree with VLLM_USE_BREAKABLE_CUDAGRAPH=0: its HCHeadOp is inside compiled code; DSV4 cannot
run on this AVX2 machine). Started by the capture job in place of vLLM's API server: without
``--enforce-eager`` it does what the plugin does on that tree — reports the refusal
(hooks.plugin.report_refusal, REQUANT_CAPTURE_REFUSAL) and exits; with it, it answers
/health until SIGINT."""
import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

from requant.hooks.plugin import report_refusal

if "--enforce-eager" not in sys.argv:  # the message of the plugin's EagerRequired on that tree
    report_refusal(os.environ["REQUANT_CAPTURE_REFUSAL"], RuntimeError(
        "capture point 'target_pre_head' reads input of model.hc_head_op (HCHeadOp), inside model "
        "(DeepseekV4Model), which vLLM torch.compiles (compiled code runs no Python hooks): start vLLM with "
        "--enforce-eager"))
    sys.exit(1)


class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *a):
        pass


try:
    HTTPServer(("127.0.0.1", int(sys.argv[sys.argv.index("--port") + 1])), Health).serve_forever()
except KeyboardInterrupt:
    pass
