#!/bin/sh
# gpuphase spin-down hook (docs/scaling.md): scale to zero the Deployment of every service whose
# GPUs have all been idle for longer than IDLE_SECONDS.
#
# It asks Prometheus (QUERY, one series per GPU of each service: {service, instance, gpu, ...}
# with the seconds that GPU has been idle) and decides per service: a service is idle only if
# every one of its GPUs in the answer is idle longer than IDLE_SECONDS; a GPU that is busy, or
# whose value is not a plain number, keeps the whole service. A service is taken as the
# Deployment of the same name in NAMESPACE.
#
# Environment:
#   PROMETHEUS_URL     Prometheus (or a querier with its HTTP API), e.g. http://prometheus-operated.monitoring.svc:9090
#   NAMESPACE          namespace of the Deployments (the Role allows no other)
#   QUERY              the PromQL above (the CronJob sets it)
#   IDLE_SECONDS       idle time before a service is scaled to zero (default 3600)
#   DRY_RUN            "false" scales; anything else only prints what it would do (default true)
#   SERVICES           if set: only these services (space-separated) may be scaled
#   EXCLUDE_SERVICES   services (space-separated) never scaled
#
# Needs only a POSIX sh, curl, awk, sort and kubectl: no jq. The answer of /api/v1/query is parsed
# with awk, which is safe here because JSON escapes every quote inside a label value, so
# `"service":"` and `"value":[` can only be keys. Service names come from the model servers'
# spans: one that is not a Deployment name (lower-case letters, digits, '-' and '.'; no space,
# no escape) is skipped whole, never trimmed into one that is, and never reaches kubectl.
set -eu
# Byte-wise character ranges and sorting, whatever the image's locale.
LC_ALL=C
export LC_ALL

: "${PROMETHEUS_URL:?set PROMETHEUS_URL, e.g. http://prometheus-operated.monitoring.svc:9090}"
: "${NAMESPACE:?set NAMESPACE, the namespace of the model servers Deployments}"
: "${QUERY:?set QUERY, the per-GPU idle seconds of each service}"
IDLE_SECONDS=${IDLE_SECONDS:-3600}
DRY_RUN=${DRY_RUN:-true}
SERVICES=${SERVICES:-}
EXCLUDE_SERVICES=${EXCLUDE_SERVICES:-}

log() {
  printf 'spin-down: %s\n' "$*"
}

case $IDLE_SECONDS in
  '' | *[!0-9]*)
    log "IDLE_SECONDS must be a whole number of seconds, not '$IDLE_SECONDS'" >&2
    exit 2
    ;;
esac

# A Deployment name: an RFC 1123 subdomain (and never an option such as --all).
is_deployment_name() {
  case $1 in
    '' | *[!a-z0-9.-]* | [!a-z0-9]* | *[!a-z0-9]) return 1 ;;
  esac
  [ "${#1}" -le 253 ]
}

# Whether the space-separated list $2 holds the word $1.
listed() {
  case " $2 " in
    *" $1 "*) return 0 ;;
  esac
  return 1
}

answer=$(curl --silent --show-error --fail --max-time 30 --get \
  --data-urlencode "query=$QUERY" "${PROMETHEUS_URL%/}/api/v1/query")

case $answer in
  *'"status":"success"'*) ;;
  *)
    log "Prometheus did not answer the query: $answer" >&2
    exit 1
    ;;
esac
case $answer in
  *'"resultType":"vector"'*) ;;
  *)
    log "expected an instant vector from the query, got: $answer" >&2
    exit 1
    ;;
esac

# One line per service, `idle|busy GPUS NAME`, sorted so that runs read alike; names that are no
# Deployment name are counted on one line `invalid SERIES`.
decisions=$(printf '%s\n' "$answer" | awk -v threshold="$IDLE_SECONDS" '
  { text = text $0 }
  END {
    gsub(/[{][ ]*"metric"[ ]*:/, "\n", text)
    n = split(text, part, "\n")
    for (i = 2; i <= n; i++) {
      if (!match(part[i], /"service"[ ]*:[ ]*"[^"]*"/)) continue
      name = substr(part[i], RSTART, RLENGTH)
      sub(/^"service"[ ]*:[ ]*"/, "", name)
      sub(/"$/, "", name)
      gpus[name]++
      if (!match(part[i], /"value"[ ]*:[ ]*\[[^],]*,[ ]*"[^"]*"/)) { busy[name] = 1; continue }
      value = substr(part[i], RSTART, RLENGTH)
      sub(/^.*,[ ]*"/, "", value)
      sub(/"$/, "", value)
      if (value !~ /^[0-9]+(\.[0-9]+)?([eE][+]?[0-9]+)?$/ || value + 0 <= threshold + 0) busy[name] = 1
    }
    for (name in gpus) {
      if (name ~ /^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$/ && length(name) <= 253)
        print ((name in busy) ? "busy" : "idle"), gpus[name], name
      else
        invalid += gpus[name]
    }
    if (invalid) print "invalid", invalid
  }' | sort -k 3)

if [ "$DRY_RUN" = false ]; then
  log "scaling to zero the services idle for more than ${IDLE_SECONDS}s in namespace $NAMESPACE"
else
  log "DRY_RUN: nothing is scaled (set DRY_RUN=false to act)"
fi

failed=0
while read -r state gpus service; do
  [ -n "$state" ] || continue
  if [ "$state" = invalid ]; then
    log "skip $gpus series whose service label is not a Deployment name"
    continue
  fi
  if ! is_deployment_name "$service"; then
    log "skip '$service': not a Deployment name"
    continue
  fi
  if [ "$service" = other ]; then
    log "skip other: the agent's label for services beyond --phase.max-services"
    continue
  fi
  if [ -n "$SERVICES" ] && ! listed "$service" "$SERVICES"; then
    log "skip $service: not in SERVICES"
    continue
  fi
  if listed "$service" "$EXCLUDE_SERVICES"; then
    log "skip $service: in EXCLUDE_SERVICES"
    continue
  fi
  if [ "$state" != idle ]; then
    log "keep $service: not all of its $gpus GPU(s) idle for more than ${IDLE_SECONDS}s"
    continue
  fi
  if [ "$DRY_RUN" != false ]; then
    log "would run: kubectl scale deployment/$service --replicas=0 -n $NAMESPACE ($gpus GPU(s) idle)"
    continue
  fi
  log "$service: $gpus GPU(s) idle for more than ${IDLE_SECONDS}s"
  if ! kubectl scale "deployment/$service" --replicas=0 -n "$NAMESPACE"; then
    log "could not scale deployment/$service in $NAMESPACE" >&2
    failed=$((failed + 1))
  fi
done <<EOF
$decisions
EOF

if [ "$failed" -gt 0 ]; then
  log "$failed Deployment(s) could not be scaled" >&2
  exit 1
fi
