"""``cdk synth`` / ``cdk deploy tmuxi-<env>``: one stack per environment of cdk.json's ``tmuxi:environments``,
each checked by cdk-nag's AwsSolutions pack (an unsuppressed error fails synthesis)."""
from __future__ import annotations

import sys
import time

import aws_cdk as cdk
from aws_cdk import cx_api
from cdk_nag import AwsSolutionsChecks

from cdk.config import CONTEXT_KEY, EnvConfig, load
from cdk.names import STACK_PREFIX
from cdk.stack import TmuxiStack


def build(app: cdk.App, only: list[str] | None = None) -> dict[str, TmuxiStack]:
    configs = load(app.node.try_get_context(CONTEXT_KEY))
    stacks = {}
    for name, config in configs.items():
        if only is not None and name not in only:
            continue
        stacks[name] = TmuxiStack(app, f"{STACK_PREFIX}-{name}", config=config, env=_env(config),
                                  description=f"tmuxi ({name}): tmux sessions over REST and WebSocket")
    cdk.Aspects.of(app).add(AwsSolutionsChecks(verbose=True))
    return stacks


def _env(config: EnvConfig) -> cdk.Environment:
    # account None: the one `cdk deploy` runs with (CDK_DEFAULT_ACCOUNT); synthesis needs no credentials
    return cdk.Environment(account=config.account, region=config.region)


def errors(assembly: cx_api.CloudAssembly) -> list[str]:
    """Error annotations (cdk-nag's unsuppressed findings among them): what makes `cdk synth` fail."""
    return [f"{stack.stack_name} {m.id}: {m.entry.data}" for stack in assembly.stacks for m in stack.messages
            if m.level == cx_api.SynthesisMessageLevel.ERROR]


def main() -> None:
    t0 = time.perf_counter()
    app = cdk.App()
    stacks = build(app)
    assembly = app.synth()
    found = errors(assembly)
    for line in found:
        print(f"error: {line}", file=sys.stderr)
    print(f"synthesized {', '.join(s.stack_name for s in stacks.values())} in {time.perf_counter() - t0:.1f} s"
          f" ({len(found)} errors)", file=sys.stderr)
    if found:
        sys.exit(1)


if __name__ == "__main__":
    main()
