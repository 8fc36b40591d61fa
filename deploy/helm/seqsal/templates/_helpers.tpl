{{/* Names */}}
{{- define "seqsal.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "seqsal.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "seqsal.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels: call with (dict "ctx" $ "component" "saliency") */}}
{{- define "seqsal.selectorLabels" -}}
app.kubernetes.io/name: {{ include "seqsal.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "seqsal.labels" -}}
helm.sh/chart: {{ include "seqsal.chart" .ctx }}
{{ include "seqsal.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: seqsal
{{- end -}}

{{- define "seqsal.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "seqsal.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The image of a component: (dict "ctx" $ "image" .Values.saliency.image) */}}
{{- define "seqsal.image" -}}
{{- $tag := default .ctx.Chart.AppVersion .ctx.Values.image.tag -}}
{{- if .ctx.Values.image.registry -}}
{{- printf "%s/%s:%s" (trimSuffix "/" .ctx.Values.image.registry) .image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* In-cluster DNS name of a component's Service */}}
{{- define "seqsal.host" -}}
{{- printf "%s-%s.%s.svc.%s" (include "seqsal.fullname" .ctx) .component .ctx.Release.Namespace .ctx.Values.clusterDomain -}}
{{- end -}}

{{/* Auth Secret name */}}
{{- define "seqsal.authSecretName" -}}
{{- default (printf "%s-auth" (include "seqsal.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{/* The UI's token: the value given, else the one already in the cluster, else a new random one */}}
{{- define "seqsal.authToken" -}}
{{- if .Values.auth.token -}}
{{- .Values.auth.token -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "seqsal.authSecretName" .) -}}
{{- if and $existing $existing.data (hasKey $existing.data .Values.auth.secretKeys.token) -}}
{{- index $existing.data .Values.auth.secretKeys.token | b64dec -}}
{{- else -}}
{{- randAlphaNum 48 -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "seqsal.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s-redis.%s.svc.%s:6379/0" (include "seqsal.fullname" .) .Release.Namespace .Values.clusterDomain -}}
{{- else -}}
{{- .Values.redis.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* Environment both gRPC servers share */}}
{{- define "seqsal.serverEnv" -}}
- name: SEQSAL_LOG_FORMAT
  value: json
- name: SEQSAL_LOG_LEVEL
  value: {{ .Values.server.logLevel | quote }}
- name: SEQSAL_RATE_LIMIT_PER_MINUTE
  value: {{ .Values.server.rateLimitPerMinute | quote }}
- name: SEQSAL_SHUTDOWN_DELAY_S
  value: {{ .Values.server.shutdownDelaySeconds | quote }}
- name: SEQSAL_SHUTDOWN_GRACE_S
  value: {{ .Values.server.shutdownGraceSeconds | quote }}
{{- if .Values.models.spec }}
- name: SEQSAL_MODELS
  value: {{ .Values.models.spec | quote }}
{{- end }}
{{- if .Values.auth.enabled }}
- name: SEQSAL_AUTH_TOKEN_FILE
  value: /var/run/seqsal/auth/{{ .Values.auth.secretKeys.tokens }}
{{- else }}
# No authentication: the chart's operator said so (auth.enabled: false).
- name: SEQSAL_ALLOW_UNAUTHENTICATED
  value: "true"
{{- end }}
{{- if .Values.tls.enabled }}
- name: SEQSAL_TLS_CERT_FILE
  value: /var/run/seqsal/tls/tls.crt
- name: SEQSAL_TLS_KEY_FILE
  value: /var/run/seqsal/tls/tls.key
{{- if .Values.tls.mutual }}
- name: SEQSAL_TLS_CLIENT_CA_FILE
  value: /var/run/seqsal/tls/ca.crt
{{- end }}
{{- end }}
{{- end -}}

{{/* Volumes both gRPC servers share (mounts: seqsal.serverVolumeMounts) */}}
{{- define "seqsal.serverVolumes" -}}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- if .Values.models.existingClaim }}
- name: models
  persistentVolumeClaim:
    claimName: {{ .Values.models.existingClaim }}
    readOnly: true
{{- end }}
{{- if .Values.auth.enabled }}
- name: auth
  secret:
    secretName: {{ include "seqsal.authSecretName" . }}
    items:
      - key: {{ .Values.auth.secretKeys.tokens }}
        path: {{ .Values.auth.secretKeys.tokens }}
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ required "tls.secretName is required when tls.enabled" .Values.tls.secretName }}
{{- end }}
{{- end -}}

{{- define "seqsal.serverVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/seqsal
{{- if .Values.models.existingClaim }}
- name: models
  mountPath: {{ .Values.models.mountPath }}
  readOnly: true
{{- end }}
{{- if .Values.auth.enabled }}
- name: auth
  mountPath: /var/run/seqsal/auth
  readOnly: true
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /var/run/seqsal/tls
  readOnly: true
{{- end }}
{{- end -}}

{{/*
The gRPC health check of a server, as a probe handler: Kubernetes' native gRPC probe
(grpc.health.v1.Health/Check), or with TLS (which native probes cannot speak) the same check run
in the container with the pod's own certificate. Call with (dict "ctx" $ "port" 50051 "component" "saliency").
*/}}
{{- define "seqsal.grpcProbe" -}}
{{- if .ctx.Values.tls.enabled -}}
exec:
  command:
    - python
    - -c
    - >-
      import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g;
      f = lambda n: open('/var/run/seqsal/tls/' + n, 'rb').read();
      k = grpc.ssl_channel_credentials(f('ca.crt'), f('tls.key'), f('tls.crt'));
      c = grpc.secure_channel('127.0.0.1:' + sys.argv[1], k, [('grpc.ssl_target_name_override', sys.argv[2])]);
      sys.exit(g.HealthStub(c).Check(h.HealthCheckRequest(), timeout=5).status != h.HealthCheckResponse.SERVING)
    - {{ .port | quote }}
    - {{ default (include "seqsal.host" (dict "ctx" .ctx "component" .component)) .ctx.Values.tls.serverName | quote }}
{{- else -}}
grpc:
  port: {{ .port }}
{{- end -}}
{{- end -}}

{{/* Probes of a server: (dict "ctx" $ "port" 50051 "component" "saliency" "startupSeconds" 900) */}}
{{- define "seqsal.serverProbes" -}}
startupProbe:
  {{- include "seqsal.grpcProbe" . | nindent 2 }}
  periodSeconds: 10
  timeoutSeconds: 8
  failureThreshold: {{ div .startupSeconds 10 | max 1 }}
readinessProbe:
  {{- include "seqsal.grpcProbe" . | nindent 2 }}
  periodSeconds: 5
  timeoutSeconds: 8
  failureThreshold: 2
livenessProbe:
  {{- include "seqsal.grpcProbe" . | nindent 2 }}
  periodSeconds: 20
  timeoutSeconds: 8
  failureThreshold: 3
{{- end -}}

{{/* Pod annotations of a server: Prometheus discovery (metrics.podAnnotations) and its podAnnotations */}}
{{- define "seqsal.podAnnotations" -}}
{{- $annotations := dict -}}
{{- if .ctx.Values.metrics.podAnnotations -}}
{{- $_ := set $annotations "prometheus.io/scrape" "true" -}}
{{- $_ := set $annotations "prometheus.io/port" (toString .values.metricsPort) -}}
{{- $_ := set $annotations "prometheus.io/path" "/metrics" -}}
{{- end -}}
{{- toYaml (merge (deepCopy (.values.podAnnotations | default dict)) $annotations) -}}
{{- end -}}
