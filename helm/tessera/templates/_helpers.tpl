{{/* Names, labels and the pieces every workload shares. */}}

{{- define "tessera.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's base name; each service's objects are "<fullname>-<service>". */}}
{{- define "tessera.fullname" -}}
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

{{- define "tessera.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select every pod of this release (services, migrations, tests). */}}
{{- define "tessera.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tessera.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tessera.labels" -}}
{{ include "tessera.selectorLabels" . }}
helm.sh/chart: {{ include "tessera.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tessera
{{- end -}}

{{/* Call with (dict "root" $ "service" "ingest"). */}}
{{- define "tessera.serviceSelectorLabels" -}}
{{ include "tessera.selectorLabels" .root }}
app.kubernetes.io/component: {{ .service }}
{{- end -}}

{{- define "tessera.serviceLabels" -}}
{{ include "tessera.labels" .root }}
app.kubernetes.io/component: {{ .service }}
{{- end -}}

{{- define "tessera.serviceName" -}}
{{- printf "%s-%s" (include "tessera.fullname" .root) .service -}}
{{- end -}}

{{/* The in-cluster DNS name a service's certificate must carry: <fullname>-<service>.<namespace>.svc */}}
{{- define "tessera.serviceHost" -}}
{{- printf "%s.%s.svc" (include "tessera.serviceName" .) .root.Release.Namespace -}}
{{- end -}}

{{- define "tessera.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tessera.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tessera.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "tessera.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurityContext.runAsUser }}
runAsGroup: {{ .Values.podSecurityContext.runAsGroup }}
fsGroup: {{ .Values.podSecurityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "tessera.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "tessera.tlsDir" -}}/etc/tessera/tls{{- end -}}

{{/* The file TLS clients (probes, helm test) verify servers with: the Secret's CA, else the certificate itself. */}}
{{- define "tessera.tlsCaFile" -}}
{{- if .Values.tls.caKey -}}
{{- printf "%s/%s" (include "tessera.tlsDir" .) .Values.tls.caKey -}}
{{- else -}}
{{- printf "%s/tls.crt" (include "tessera.tlsDir" .) -}}
{{- end -}}
{{- end -}}

{{/* Environment every Tessera process of this release gets (services and migrations). */}}
{{- define "tessera.commonEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: TESSERA_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "postgresql.existingSecret: name the Secret that holds the PostgreSQL URL" .Values.postgresql.existingSecret }}
      key: {{ .Values.postgresql.urlKey }}
- name: TESSERA_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "redis.existingSecret: name the Secret that holds the Redis URL" .Values.redis.existingSecret }}
      key: {{ .Values.redis.urlKey }}
- name: TESSERA_REDIS_CLUSTER
  value: {{ .Values.redis.cluster | quote }}
- name: TESSERA_REDIS_PREFIX
  value: {{ .Values.redis.prefix | quote }}
- name: TESSERA_REDIS_WAIT_REPLICAS
  value: {{ .Values.redis.waitReplicas | quote }}
- name: TESSERA_LOG_LEVEL
  value: {{ .Values.config.logLevel | quote }}
- name: TESSERA_DATA_DIR
  value: /tmp/tessera
{{- if .Values.serviceToken.existingSecret }}
- name: TESSERA_SERVICE_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.serviceToken.existingSecret }}
      key: {{ .Values.serviceToken.key }}
{{- end }}
{{- end -}}

{{/* OTEL_* for one component. Call with (dict "root" $ "service" "ingest"). */}}
{{- define "tessera.otelEnv" -}}
{{- $otel := .root.Values.otel -}}
- name: OTEL_SERVICE_NAME
  value: {{ printf "tessera-%s" .service | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "service.namespace=%s,service.version=%s,deployment.environment.name=%s,k8s.namespace.name=$(POD_NAMESPACE),k8s.pod.name=$(POD_NAME)" $otel.serviceNamespace .root.Chart.AppVersion $otel.environment | quote }}
{{- if $otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $otel.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: grpc
{{- end }}
{{- if $otel.tracesSampler }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $otel.tracesSampler | quote }}
{{- end }}
{{- if $otel.tracesSamplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $otel.tracesSamplerArg | quote }}
{{- end }}
{{- end -}}

{{/* A health probe. Call with (dict "root" $ "port" 50051 "service" "tessera.liveness" "host" "<svc>.<ns>.svc" "probe" <values>).
     kubelet's native gRPC probe speaks no TLS, so with TLS on the probe runs `tessera health` in the container. */}}
{{- define "tessera.probe" -}}
{{- if .root.Values.tls.enabled }}
exec:
  command:
    - tessera
    - health
    - {{ printf "localhost:%v" .port | quote }}
    - --service
    - {{ .service | quote }}
    - --ca-file
    - {{ include "tessera.tlsCaFile" .root }}
    - --server-name
    - {{ .host }}
    - --timeout
    - {{ .probe.timeoutSeconds | quote }}
{{- else }}
grpc:
  port: {{ .port }}
  service: {{ .service | quote }}
{{- end }}
{{- with .probe }}
initialDelaySeconds: {{ .initialDelaySeconds }}
periodSeconds: {{ .periodSeconds }}
{{- /* exec probes start a Python process: give them a second more than the check's own timeout */}}
timeoutSeconds: {{ if $.root.Values.tls.enabled }}{{ add .timeoutSeconds 1 }}{{ else }}{{ .timeoutSeconds }}{{ end }}
failureThreshold: {{ .failureThreshold }}
{{- if hasKey . "successThreshold" }}
successThreshold: {{ .successThreshold }}
{{- end }}
{{- end }}
{{- end -}}

{{/* An HTTP probe of the gateway's health endpoints (/healthz: the process; /readyz: serving, not draining). */}}
{{- define "tessera.httpProbe" -}}
httpGet:
  path: {{ .path }}
  port: http
{{- with .probe }}
initialDelaySeconds: {{ .initialDelaySeconds }}
periodSeconds: {{ .periodSeconds }}
timeoutSeconds: {{ .timeoutSeconds }}
failureThreshold: {{ .failureThreshold }}
{{- if hasKey . "successThreshold" }}
successThreshold: {{ .successThreshold }}
{{- end }}
{{- end }}
{{- end -}}
